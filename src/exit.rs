//! Every exit code of `datastore`, in one table: each code means one thing, whichever command
//! exits with it. The README's "Exit codes" table is [`TABLE`] (a test holds them together).
//! `datastore run` is the exception the SDK sets: it exits with the script's own code.

pub const SUCCESS: i32 = 0;
/// Several files failed for different reasons (each was printed).
pub const PARTIAL: i32 = 1;
/// Wrong command-line usage (clap's own code).
pub const USAGE: i32 = 2;
pub const CONFIG: i32 = 3;
pub const AUTH: i32 = 4;
pub const NOT_FOUND: i32 = 5;
pub const UNREACHABLE: i32 = 6;
pub const INTEGRITY: i32 = 7;
pub const UNSAFE_NAME: i32 = 8;
pub const SERVICE: i32 = 9;
pub const LOCAL: i32 = 10;
/// `submit --wait`: the Experiment ended Failed.
pub const EXPERIMENT_FAILED: i32 = 11;
/// `controller`: the leader lost its Lease (Kubernetes restarts it as a standby).
pub const LEASE_LOST: i32 = 12;
/// `submit --wait`: the Experiment did not end within `--timeout` (as `timeout(1)` exits).
pub const TIMEOUT: i32 = 124;

/// The code of a command stopped by `signal` (130 for SIGINT, 143 for SIGTERM), as a shell
/// reports it.
pub fn signaled(signal: i32) -> i32 {
    128 + signal
}

/// Each code and what it means, as the README lists them.
pub const TABLE: &[(i32, &str)] = &[
    (SUCCESS, "success (skipped files are not failures)"),
    (
        PARTIAL,
        "several files failed for different reasons (each is printed)",
    ),
    (USAGE, "wrong command-line usage"),
    (
        CONFIG,
        "configuration: malformed datastores file, unknown datastore, bad Secret or endpoint",
    ),
    (
        AUTH,
        "the storage service or the cluster refused the credentials or permissions",
    ),
    (
        NOT_FOUND,
        "not found: container, local datastore directory, source directory",
    ),
    (
        UNREACHABLE,
        "unreachable: the endpoint (or the cluster API) cannot be reached",
    ),
    (
        INTEGRITY,
        "integrity: data differs from its Content-MD5 or size",
    ),
    (
        UNSAFE_NAME,
        "unsafe blob names (`..`, absolute, NUL, file/directory collision); nothing was written",
    ),
    (
        SERVICE,
        "another storage service error (transient ones after the retry budget)",
    ),
    (
        LOCAL,
        "a local file could not be read or written; a full or read-only disk stops the run at its first file",
    ),
    (EXPERIMENT_FAILED, "`submit --wait`: the Experiment failed"),
    (
        LEASE_LOST,
        "`controller`: the leader lost its Lease; Kubernetes restarts it as a standby",
    ),
    (
        TIMEOUT,
        "`submit --wait`: the Experiment did not end within `--timeout`",
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    /// The rows of the README's "Exit codes" table whose first cell is one code.
    fn readme_rows() -> Vec<(i32, String)> {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
            .expect("README.md");
        let table = readme
            .split("### Exit codes")
            .nth(1)
            .expect("the README has an Exit codes section");
        table
            .lines()
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'))
            .filter_map(|row| {
                let cells: Vec<&str> = row.split('|').map(str::trim).collect();
                Some((cells.get(1)?.parse().ok()?, cells.get(2)?.to_string()))
            })
            .collect()
    }

    #[test]
    fn the_readme_lists_every_exit_code_as_this_table_does() {
        let listed: Vec<(i32, String)> = TABLE
            .iter()
            .map(|(code, meaning)| (*code, meaning.to_string()))
            .collect();
        assert_eq!(readme_rows(), listed);
    }

    #[test]
    fn each_code_means_one_thing() {
        let mut codes: Vec<i32> = TABLE.iter().map(|(code, _)| *code).collect();
        codes.extend([signaled(2), signaled(15)]);
        let before = codes.len();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), before, "a code is listed twice");
        assert_eq!((signaled(2), signaled(15)), (130, 143));
    }
}
