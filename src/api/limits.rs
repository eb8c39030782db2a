//! The bounds of what a spec may hold, in one place: Kubernetes' rule for the names of the
//! objects it refers to, and the kernel's limits on a command line. The CRDs' schemas and CEL
//! rules, the planner (for `datastore run`, which no apiserver checks) and the README say these.

/// Kubernetes' DNS-1123 subdomain, the rule for the names of Datastores, ClusterDatastores,
/// Secrets, PersistentVolumeClaims, StorageClasses and ServiceAccounts, as an anchored RE2 regex
/// (what CEL's `matches` and a schema's `pattern` take).
pub const DNS1123_SUBDOMAIN: &str =
    "^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// The longest DNS-1123 subdomain.
pub const NAME_MAX: usize = 253;

/// The CEL rule of a field that holds an object's name (with `maxLength` [`NAME_MAX`], which also
/// keeps the rule's cost bounded).
pub const NAME_RULE: &str =
    "self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')";

/// What the name rule asks for, after the field's own words ("datastore must name ...").
macro_rules! name_rule {
    ($field:literal, $what:literal, $example:literal) => {
        concat!(
            $field,
            " must be the name of ",
            $what,
            ": lowercase letters, digits, '-' and '.', starting and ending with a letter or digit (Kubernetes' DNS-1123 subdomain), e.g. ",
            $example
        )
    };
}

/// The messages of [`NAME_RULE`] on each field.
pub const DATASTORE_NAME: &str = name_rule!(
    "datastore",
    "a Datastore in the Experiment's namespace or of a ClusterDatastore (no namespace/ prefix)",
    "blob-ds"
);
pub const SERVICE_ACCOUNT_NAME: &str =
    name_rule!("serviceAccountName", "a ServiceAccount", "trainer");
pub const STORAGE_CLASS_NAME: &str =
    name_rule!("storageClassName", "a StorageClass", "managed-csi");
pub const CLAIM_NAME: &str = name_rule!(
    "claimName",
    "a PersistentVolumeClaim in the Experiment's namespace",
    "scratch"
);
pub const SECRET_NAME: &str = name_rule!(
    "secretRef.name",
    "a Secret (in the Datastore's namespace; for a ClusterDatastore, the operator's)",
    "blob-ds-key"
);

/// Whether `name` is a DNS-1123 subdomain ([`DNS1123_SUBDOMAIN`], at most [`NAME_MAX`]).
pub fn is_dns1123_subdomain(name: &str) -> bool {
    let label = |l: &str| {
        let b = l.as_bytes();
        !b.is_empty()
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            && b[0] != b'-'
            && b[b.len() - 1] != b'-'
    };
    name.len() <= NAME_MAX && name.split('.').all(label)
}

// The kernel's limits on what `execve` takes (fs/exec.c, include/uapi/linux/binfmts.h):
// MAX_ARG_STRLEN, 32 pages, is the most one argument or environment string may hold with its
// NUL; ARG_MAX, a quarter of the stack limit (8 MiB by default, so 2 MiB), bounds all of them
// together, with a pointer of 8 bytes each. Beyond either, the container cannot start
// (`exec ...: argument list too long`).

/// MAX_ARG_STRLEN: one argument or environment string, with its NUL, in bytes.
pub const KERNEL_ARG_BYTES: usize = 32 * 4096;

/// ARG_MAX with the default 8 MiB stack: arguments and environment together, in bytes.
pub const KERNEL_ARGS_TOTAL_BYTES: usize = 2 * 1024 * 1024;

/// The most characters one scriptParams value, command element or env value may hold. A
/// character is at most 4 bytes in UTF-8, so 32,000 of them stay under MAX_ARG_STRLEN even then.
pub const ARG_MAX_CHARS: usize = 32_000;

/// The most bytes the script's command line and environment may hold together, counted as the
/// kernel counts them (each string with its NUL and an 8-byte pointer): half of ARG_MAX,
/// leaving the other half to what is added at run time (the variables Kubernetes sets for the
/// namespace's Services, a Secret's or ConfigMap's values, the shell that enters a relative
/// sourceDirectory).
pub const COMMAND_LINE_MAX_BYTES: usize = KERNEL_ARGS_TOTAL_BYTES / 2;

/// The CRD's share of [`COMMAND_LINE_MAX_BYTES`]: the command line the spec spells out (the
/// command, or `python` and entryScript, and the scriptParams' names and values, each with its
/// NUL and pointer), counted in characters, which are never more than bytes, so it refuses no
/// spec the planner would take. What only the planner sees (the references' paths, `env`) and
/// characters of several bytes, the planner counts. Its number is [`COMMAND_LINE_MAX_BYTES`]
/// (a test checks).
pub const COMMAND_LINE_RULE: &str = "(has(self.command) ? self.command.map(c, size(c) + 9).sum() : size(self.entryScript) + 24) + (has(self.scriptParams) ? self.scriptParams.map(p, size(p.name) + 9 + (has(p.value) ? size(p.value) + 9 : 0)).sum() : 0) <= 1048576";

/// The message of [`COMMAND_LINE_RULE`].
pub const COMMAND_LINE_MESSAGE: &str = "the script's command line (command, or python and entryScript, and the scriptParams' names and values) holds more than the 1048576 bytes allowed (the kernel refuses to start a program with more than 2 MiB of arguments and environment, counting 9 bytes more for each string); pass large inputs as a file in a datastore (a dataReference) instead";

/// The advice that ends every refusal of an over-long command line.
pub const COMMAND_LINE_ADVICE: &str =
    "pass large inputs as a file in a datastore (a dataReference) instead";

// The limits stay under the kernel's, even in four-byte characters (checked when compiling).
const _: () = assert!(ARG_MAX_CHARS * 4 < KERNEL_ARG_BYTES);
const _: () = assert!(COMMAND_LINE_MAX_BYTES < KERNEL_ARGS_TOTAL_BYTES);

/// What one string of the command line or environment costs against ARG_MAX: its bytes, its
/// NUL and its pointer.
pub fn exec_bytes(s: &str) -> usize {
    s.len() + 1 + 8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_rule_and_its_message_say_the_limit() {
        let limit = COMMAND_LINE_MAX_BYTES.to_string();
        assert!(COMMAND_LINE_RULE.ends_with(&format!("<= {limit}")));
        assert!(COMMAND_LINE_MESSAGE.contains(&format!("the {limit} bytes allowed")));
        assert!(COMMAND_LINE_MESSAGE.ends_with(COMMAND_LINE_ADVICE));
        // `python` with its NUL and pointer, and entryScript's: 15 + 9.
        assert_eq!(exec_bytes("python") + exec_bytes(""), 24);
    }

    #[test]
    fn the_name_rule_is_kubernetes_dns_subdomain() {
        for ok in [
            "blob-ds",
            "a",
            "0",
            "team-b.blob-ds",
            "a.b.c",
            &"a".repeat(253),
        ] {
            assert!(is_dns1123_subdomain(ok), "{ok}");
        }
        for bad in [
            "",
            "team-b/blob-ds",
            "Blob",
            "-a",
            "a-",
            "a..b",
            ".a",
            "a.",
            "a_b",
            "a b",
            &"a".repeat(254),
        ] {
            assert!(!is_dns1123_subdomain(bad), "{bad}");
        }
        // The CEL rule holds the same regex.
        assert!(NAME_RULE.contains(DNS1123_SUBDOMAIN));
    }
}
