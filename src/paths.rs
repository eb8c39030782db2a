//! Datastore paths and blob names: normalizing what users type, and mapping blob names to
//! local files without ever leaving the target directory.

use std::path::{Path, PathBuf};

/// A datastore path as users write it (`/data/files/`, `data//files`) in its canonical form
/// (`data/files`): no leading, trailing or doubled `/`. The container root is `""`.
pub fn normalize(path: &str) -> String {
    path.split('/')
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("/")
}

/// A datastore folder path from a user (`--target-path`, a data reference's `path`),
/// normalized, or why it cannot be used. `.` and `..` segments are refused: URLs resolve them,
/// so `../other` would address another container.
pub fn datastore_path(path: &str) -> Result<String, String> {
    let normalized = normalize(path);
    if has_dot_segment(&normalized) {
        return Err(format!(
            "the datastore path '{path}' has a `.` or `..` segment; datastore paths are folders inside the container: remove them"
        ));
    }
    Ok(normalized)
}

/// Whether a name has a `.` or `..` segment. A backslash counts as the separator it becomes:
/// the Blob service stores `a\..\b` as `a/../b`.
pub fn has_dot_segment(name: &str) -> bool {
    segments(name).any(|s| s == "." || s == "..")
}

/// Why a path meant to stay inside a folder (an `entryScript` inside `sourceDirectory`) would
/// leave it, if it would: it is absolute or has a `..` segment, a backslash counting as a
/// separator as in [`has_dot_segment`]. `./train.py` stays inside.
pub fn leaves_folder(path: &str) -> Option<&'static str> {
    if path.starts_with(['/', '\\']) {
        Some("is absolute")
    } else if segments(path).any(|s| s == "..") {
        Some("has a `..` segment")
    } else {
        None
    }
}

/// The segments of a path, split at `/` and at `\`.
fn segments(path: &str) -> impl Iterator<Item = &str> {
    path.split(['/', '\\'])
}

/// A blob name (or a path made of one) as it may be shown to a human: control characters
/// (ESC, newline, ...), the bidirectional-text overrides and `\` are escaped as Rust writes
/// them (`\u{1b}`, `\n`, `\\`), so a name from the service cannot drive the terminal or forge
/// a line of output; any other character, ordinary unicode included, is kept as it is.
pub fn display_name(name: &str) -> std::borrow::Cow<'_, str> {
    let escaped = |c: char| {
        c.is_control()
            || c == '\\'
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !name.chars().any(escaped) {
        return name.into();
    }
    let mut out = String::with_capacity(name.len() + 8);
    for c in name.chars() {
        if escaped(c) {
            // Rust's debug escape of these is `\n`, `\u{1b}`, `\u{202e}`, `\\`.
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out.into()
}

/// A local path as it may be shown to a human: [`display_name`] of its text.
pub fn display_path(path: &Path) -> String {
    display_name(&path.to_string_lossy()).into_owned()
}

/// `prefix/name`, or `name` when the prefix is the container root.
pub fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}/{name}")
    }
}

/// A blob name whose name ends in `/` is a folder marker (written by some tools), not a file.
pub fn is_folder_marker(name: &str) -> bool {
    name.ends_with('/')
}

/// The relative local path a blob name maps to, or why it cannot be written safely.
pub fn local_relative(name: &str) -> Result<PathBuf, &'static str> {
    if name.is_empty() {
        return Err("the name is empty");
    }
    if name.contains('\0') {
        return Err("the name contains a NUL character");
    }
    if name.starts_with('/') {
        return Err("the name is absolute");
    }
    if name.contains('\\') {
        return Err("the name contains a backslash, which some systems read as a separator");
    }
    let mut rel = PathBuf::new();
    if name
        .rsplit('/')
        .next()
        .is_some_and(|last| last.starts_with(crate::atomic::TEMP_PREFIX))
    {
        return Err("the name looks like one of our temporary files (.datastore-partial-...)");
    }
    for segment in name.split('/') {
        match segment {
            "" => return Err("the name has an empty path segment (`//`)"),
            "." | ".." => {
                return Err(
                    "the name has a `.` or `..` segment that could leave the target directory",
                );
            }
            s if s.len() > 255 => {
                return Err("a path segment is longer than 255 bytes, the file system's limit");
            }
            s => rel.push(s),
        }
    }
    Ok(rel)
}

/// The local file for a blob: `root/<blob name>`, refusing any name that would land outside.
pub fn local_path(root: &Path, name: &str) -> Result<PathBuf, &'static str> {
    local_relative(name).map(|rel| root.join(rel))
}

/// The names that collide as file and directory (`a` and `a/b`), each as `(file, inside it)`.
pub fn file_directory_collisions<'a>(
    names: impl IntoIterator<Item = &'a str>,
) -> Vec<(String, String)> {
    let mut sorted: Vec<&str> = names.into_iter().collect();
    sorted.sort_unstable();
    let set: std::collections::HashSet<&str> = sorted.iter().copied().collect();
    let mut out = Vec::new();
    for name in &sorted {
        // Any proper ancestor that is itself a blob collides with this one.
        for (i, _) in name.match_indices('/') {
            let ancestor = &name[..i];
            if set.contains(ancestor) {
                out.push((ancestor.to_string(), name.to_string()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_strips_slashes() {
        assert_eq!(normalize("/data/files/"), "data/files");
        assert_eq!(normalize("data//files"), "data/files");
        assert_eq!(normalize("/"), "");
        assert_eq!(normalize(""), "");
    }

    #[test]
    fn unsafe_names_are_refused() {
        for bad in [
            "../x",
            "a/../../x",
            "d/.datastore-partial-1",
            "/etc/passwd",
            "a\0b",
            "a//b",
            "./a",
            "a\\..\\b",
            "",
        ] {
            assert!(local_relative(bad).is_err(), "{bad:?} should be refused");
        }
        let long = "x".repeat(256);
        assert!(local_relative(&long).is_err());
    }

    #[test]
    fn datastore_paths_refuse_dot_segments() {
        assert_eq!(datastore_path("/data/files/").unwrap(), "data/files");
        assert_eq!(datastore_path("").unwrap(), "");
        for bad in [
            "../other",
            "a/./b",
            "a/..",
            "/..",
            "a\\..\\..\\x",
            "..\\other",
            "a/.\\b",
        ] {
            assert!(datastore_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn paths_that_leave_their_folder_are_named() {
        for inside in ["train.py", "./train.py", "src/train.py", "a..b/c.py"] {
            assert_eq!(leaves_folder(inside), None, "{inside}");
        }
        for (outside, why) in [
            ("../outside.py", "has a `..` segment"),
            ("src/../../x.py", "has a `..` segment"),
            ("..\\outside.py", "has a `..` segment"),
            ("/etc/x.py", "is absolute"),
            ("\\x.py", "is absolute"),
        ] {
            assert_eq!(leaves_folder(outside), Some(why), "{outside}");
        }
    }

    #[test]
    fn names_are_shown_with_control_characters_escaped_and_unicode_kept() {
        assert_eq!(
            display_name("data/ü ñ 日本/a b.txt"),
            "data/ü ñ 日本/a b.txt"
        );
        assert_eq!(display_name("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(display_name("a\nerror: forged"), "a\\nerror: forged");
        assert_eq!(display_name("a\r\tb\u{7f}\u{9b}"), "a\\r\\tb\\u{7f}\\u{9b}");
        assert_eq!(display_name("evil\u{202e}txt.exe"), "evil\\u{202e}txt.exe");
        // A literal backslash-n stays distinguishable from an escaped newline.
        assert_eq!(display_name("a\\nb"), "a\\\\nb");
        assert_eq!(
            display_path(Path::new("/t/x\u{1b}y")),
            "/t/x\\u{1b}y".to_string()
        );
    }

    #[test]
    fn ordinary_names_map_below_root() {
        let p = local_path(Path::new("/t"), "data/a b/ü%#?.txt").unwrap();
        assert_eq!(p, Path::new("/t/data/a b/ü%#?.txt"));
        assert!(p.starts_with("/t"));
    }

    #[test]
    fn collisions_are_found() {
        let c = file_directory_collisions(["a", "a/b", "ab", "c/d", "c/d/e/f"]);
        assert_eq!(
            c,
            vec![
                ("a".to_string(), "a/b".to_string()),
                ("c/d".to_string(), "c/d/e/f".to_string())
            ]
        );
        assert!(file_directory_collisions(["a/b", "a/c", "ab"]).is_empty());
    }
}
