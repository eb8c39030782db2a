//! Every way a transfer can fail before or while it talks to the store ends in one clear
//! sentence with the fix and a documented exit code; SAS and connection-string credentials
//! work; credentials never reach the output, at any log level.

mod common;

use std::process::Output;
use std::time::{Duration, Instant};

use common::*;
use datastore_operator::store::sas::Permissions;

// Exit codes, as documented in the README and src/error.rs.
const CONFIG: i32 = 3;
const AUTH: i32 = 4;
const NOT_FOUND: i32 = 5;
const UNREACHABLE: i32 = 6;

/// The one error line of a failed text-mode run, without its `error: ` prefix. At the default
/// log level nothing else may be on stderr: the sentence stands alone.
#[track_caller]
fn error_sentence(o: &Output) -> String {
    let err = stderr(o);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "exactly one line on stderr, got: {err:?}; stdout: {}",
        stdout(o)
    );
    let msg = lines[0]
        .strip_prefix("error: ")
        .unwrap_or_else(|| panic!("stderr starts with `error: `: {err:?}"));
    // One sentence: no line breaks inside, and not empty.
    assert!(msg.len() > 20, "a real sentence: {msg:?}");
    msg.to_string()
}

/// Asserts that `msg` mentions each of `words` (case-insensitively).
#[track_caller]
fn assert_mentions(msg: &str, words: &[&str]) {
    let lower = msg.to_lowercase();
    for w in words {
        assert!(
            lower.contains(&w.to_lowercase()),
            "message should mention {w:?}: {msg}"
        );
    }
}

/// The failure a run reported on stdout with `--output json`: `{"error": {reason, message}}`.
#[track_caller]
fn json_error(o: &Output) -> (String, String) {
    let s = summary(o);
    let e = &s["error"];
    let reason = e["reason"]
        .as_str()
        .unwrap_or_else(|| panic!("error.reason in {s}"));
    let message = e["message"]
        .as_str()
        .unwrap_or_else(|| panic!("error.message in {s}"));
    (reason.to_string(), message.to_string())
}

fn upload_args(src: &str) -> Vec<&str> {
    vec![
        "upload",
        "--datastore",
        "blob",
        "--src-dir",
        src,
        "--target-path",
        "in",
    ]
}

fn with<'a>(mut args: Vec<&'a str>, more: &[&'a str]) -> Vec<&'a str> {
    args.extend(more);
    args
}

/// A fixture with one small file in `src`, for uploads.
async fn fixture_with_source() -> (Fixture, String) {
    let f = Fixture::new().await;
    write_tree(&f.path("src"), &[("a.txt", b"hello".to_vec())]);
    let src = f.path("src").to_str().unwrap().to_string();
    (f, src)
}

const RACWL: Permissions = Permissions {
    read: true,
    add: true,
    create: true,
    write: true,
    delete: false,
    list: true,
};

// 1. Bad credentials -----------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn wrong_account_key_is_an_auth_error_naming_the_secret() {
    let (f, src) = fixture_with_source().await;
    // Valid base64, right length, wrong key.
    use base64::Engine as _;
    let wrong = base64::engine::general_purpose::STANDARD.encode(bytes(64, 42));
    f.write_datastores(&f.container, &endpoint(), &format!("accountKey: {wrong}"));

    let up = f.cli(&upload_args(&src));
    assert_exit(&up, AUTH);
    let msg = error_sentence(&up);
    assert_mentions(
        &msg,
        &[
            "rejected",
            "account key",
            "Secret default/creds",
            &f.container,
            "rotated",
        ],
    );
    assert!(!msg.contains(&wrong), "the key is not echoed: {msg}");

    let down = f.cli(&[
        "download",
        "--datastore",
        "blob",
        "--target-path",
        f.path("out").to_str().unwrap(),
    ]);
    assert_exit(&down, AUTH);
    assert_mentions(&error_sentence(&down), &["rejected", "account key"]);
    assert!(!f.path("out").exists() || read_tree(&f.path("out")).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn account_key_that_is_not_base64_is_a_config_error() {
    let (f, src) = fixture_with_source().await;
    let bad = "this-is-not-base64!!";
    f.write_datastores(&f.container, &endpoint(), &format!("accountKey: \"{bad}\""));

    let up = f.cli(&upload_args(&src));
    assert_exit(&up, CONFIG);
    let msg = error_sentence(&up);
    assert_mentions(
        &msg,
        &[
            "accountKey",
            "not valid base64",
            "Secret default/creds",
            "Access keys",
        ],
    );
    assert!(!msg.contains(bad), "the key is not echoed: {msg}");
}

// 2. Missing container ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn missing_container_is_not_found_and_says_to_create_it() {
    let (f, src) = fixture_with_source().await;
    let missing = unique_container();
    f.write_datastores(&missing, &endpoint(), &format!("accountKey: {KEY}"));

    let up = f.cli(&upload_args(&src));
    assert_exit(&up, NOT_FOUND);
    let msg = error_sentence(&up);
    assert_mentions(
        &msg,
        &[&missing, "does not exist", "create it", "containerName"],
    );

    // --overwrite takes another path (no listing, one check): same error.
    let up = f.cli(&with(upload_args(&src), &["--overwrite"]));
    assert_exit(&up, NOT_FOUND);
    assert_mentions(&error_sentence(&up), &[&missing, "create it"]);

    let down = f.cli(&[
        "download",
        "--datastore",
        "blob",
        "--target-path",
        f.path("out").to_str().unwrap(),
    ]);
    assert_exit(&down, NOT_FOUND);
    assert_mentions(&error_sentence(&down), &[&missing, "create it"]);
}

// 3. Missing source directory --------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn missing_source_directory_is_not_found_and_names_the_flag() {
    let f = Fixture::new().await;
    let src = f.path("no-such-dir");
    let up = f.cli(&upload_args(src.to_str().unwrap()));
    assert_exit(&up, NOT_FOUND);
    let msg = error_sentence(&up);
    assert_mentions(
        &msg,
        &["--src-dir", "does not exist", src.to_str().unwrap()],
    );

    // A file given as the source directory is the same mistake.
    write_tree(&f.path("x"), &[("file.txt", b"x".to_vec())]);
    let up = f.cli(&upload_args(f.path("x/file.txt").to_str().unwrap()));
    assert_exit(&up, NOT_FOUND);
    assert_mentions(&error_sentence(&up), &["--src-dir", "not a directory"]);
    assert!(
        f.client.list("").await.unwrap().is_empty(),
        "nothing was uploaded"
    );
}

// 4. Unreachable endpoint ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_endpoint_fails_after_the_retry_budget() {
    let (f, src) = fixture_with_source().await;
    let port = free_port(); // nothing listens there
    let dead = format!("http://127.0.0.1:{port}/{ACCOUNT}");
    f.write_datastores(&f.container, &dead, &format!("accountKey: {KEY}"));

    let started = Instant::now();
    let up = f.cli(&with(upload_args(&src), &["--retry-budget", "3s"]));
    let took = started.elapsed();
    assert_exit(&up, UNREACHABLE);
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(20),
        "retried within the budget, no longer: took {took:?}"
    );
    let msg = error_sentence(&up);
    assert_mentions(
        &msg,
        &[
            "cannot reach",
            &format!("127.0.0.1:{port}"),
            "check the endpoint",
            "retry budget of 3s",
        ],
    );

    let started = Instant::now();
    let down = f.cli(&[
        "download",
        "--datastore",
        "blob",
        "--target-path",
        f.path("out").to_str().unwrap(),
        "--retry-budget",
        "0s",
    ]);
    assert!(started.elapsed() < Duration::from_secs(5), "0s: no retries");
    assert_exit(&down, UNREACHABLE);
    assert_mentions(
        &error_sentence(&down),
        &["cannot reach", "check the endpoint", "retry budget of 0s"],
    );
}

// 5. Malformed datastores file -------------------------------------------------------------

fn write(f: &Fixture, text: &str) {
    std::fs::write(f.datastores(), text).unwrap();
}

const SECRET_DOC: &str =
    "apiVersion: v1\nkind: Secret\nmetadata: {name: creds}\nstringData: {accountKey: a2V5}\n";

#[tokio::test(flavor = "multi_thread")]
async fn invalid_yaml_is_a_config_error_with_its_position() {
    let (f, src) = fixture_with_source().await;
    write(
        &f,
        &format!(
            "{SECRET_DOC}---\napiVersion: datastore.dev/v1alpha1\nkind: Datastore\nmetadata: {{name: blob\nspec: [\n"
        ),
    );
    let up = f.cli(&upload_args(&src));
    assert_exit(&up, CONFIG);
    let msg = error_sentence(&up);
    assert_mentions(
        &msg,
        &[
            f.datastores().to_str().unwrap(),
            // The stream is parsed whole: a syntax error is placed by line, not by document.
            "not valid YAML",
            "line 9",
            "fix the file",
        ],
    );
}

/// A few hundred KB of nested brackets, as a datastores file and as an Experiment file, is
/// refused at once (serde_yaml took minutes of CPU over it), naming the file and the bound.
#[test]
fn deeply_nested_yaml_is_refused_promptly_naming_the_file_and_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let depth = 80_000;
    for (name, text) in [
        ("maps.yaml", "{a: ".repeat(depth) + "1" + &"}".repeat(depth)),
        ("lists.yaml", "[".repeat(depth * 2) + &"]".repeat(depth * 2)),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, &text).unwrap();
        let path = path.to_str().unwrap();
        assert!(text.len() > 300_000, "{}", text.len());
        let runs = [
            vec![
                "download",
                "--datastore",
                "blob",
                "--target-path",
                "out",
                "--datastores",
                path,
            ],
            vec!["run", path, "--local"],
        ];
        for args in runs {
            let started = Instant::now();
            let out = datastore(&args);
            let took = started.elapsed();
            assert_exit(&out, CONFIG);
            assert!(took < Duration::from_secs(2), "{args:?} took {took:?}");
            let msg = error_sentence(&out);
            assert_mentions(&msg, &[path, "more than 64 levels deep", "fix the file"]);
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn wrongly_typed_field_is_a_config_error_with_its_position() {
    let (f, src) = fixture_with_source().await;
    write(
        &f,
        &format!(
            "{SECRET_DOC}---\napiVersion: datastore.dev/v1alpha1\nkind: Datastore\nmetadata: {{name: blob}}\nspec:\n  azureBlob: 3\n"
        ),
    );
    let up = f.cli(&upload_args(&src));
    assert_exit(&up, CONFIG);
    let msg = error_sentence(&up);
    assert_mentions(
        &msg,
        &[
            f.datastores().to_str().unwrap(),
            "document 2",
            "(Datastore) is malformed",
            // The value and the expected type; the field path (spec.azureBlob) is not given.
            "integer `3`",
            "expected struct AzureBlobSpec",
            "fix it",
        ],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn document_without_kind_is_a_config_error_with_its_position() {
    let (f, src) = fixture_with_source().await;
    write(
        &f,
        &format!("{SECRET_DOC}---\nmetadata: {{name: blob}}\nspec: {{local: {{path: x}}}}\n"),
    );
    let up = f.cli(&upload_args(&src));
    assert_exit(&up, CONFIG);
    let msg = error_sentence(&up);
    assert_mentions(
        &msg,
        &[
            f.datastores().to_str().unwrap(),
            "document 2",
            "apiVersion",
            "kind: Datastore",
        ],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn datastore_naming_no_kind_of_storage_is_a_config_error_naming_it() {
    let (f, src) = fixture_with_source().await;
    write(
        &f,
        &format!(
            "{SECRET_DOC}---\napiVersion: datastore.dev/v1alpha1\nkind: Datastore\nmetadata: {{name: blob}}\nspec: {{}}\n"
        ),
    );
    let up = f.cli(&upload_args(&src));
    assert_exit(&up, CONFIG);
    let msg = error_sentence(&up);
    // The datastore is named (not its document number): that locates it in the file.
    assert_mentions(
        &msg,
        &[
            "Datastore default/blob",
            f.datastores().to_str().unwrap(),
            "no kind of storage",
            "azureBlob",
            "local",
        ],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_datastore_name_lists_the_names_that_exist() {
    let (f, src) = fixture_with_source().await;
    let up = f.cli(&["upload", "--datastore", "blobb", "--src-dir", &src]);
    assert_exit(&up, CONFIG);
    let msg = error_sentence(&up);
    assert_mentions(
        &msg,
        &[
            "no datastore named 'blobb'",
            "namespace 'default'",
            "blob (Datastore in default)",
            "local (Datastore in default)",
        ],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_datastores_file_is_a_config_error_naming_the_flag() {
    let (f, src) = fixture_with_source().await;
    std::fs::remove_file(f.datastores()).unwrap();
    let up = f.cli(&upload_args(&src));
    assert_exit(&up, CONFIG);
    assert_mentions(
        &error_sentence(&up),
        &["cannot read the datastores file", "--datastores"],
    );
}

// 6. SAS token and connection string -------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn sas_token_round_trip() {
    let f = Fixture::new().await;
    let token = sas(&f.container, RACWL);
    f.write_datastores(&f.container, &endpoint(), &format!("sasToken: \"{token}\""));
    let tree = vec![("a.txt", b"hello".to_vec()), ("d/b.bin", bytes(5000, 7))];
    write_tree(&f.path("src"), &tree);

    let up = f.cli(&[
        "upload",
        "--datastore",
        "blob",
        "--src-dir",
        f.path("src").to_str().unwrap(),
        "--target-path",
        "/sas",
        "--output",
        "json",
    ]);
    assert_exit(&up, 0);
    assert_eq!(summary(&up)["transferred"], 2);

    let down = f.cli(&[
        "download",
        "--datastore",
        "blob",
        "--target-path",
        f.path("out").to_str().unwrap(),
        "--prefix",
        "sas",
        "--output",
        "json",
    ]);
    assert_exit(&down, 0);
    assert_eq!(summary(&down)["transferred"], 2);
    assert_eq!(
        read_tree(&f.path("out")),
        vec![
            ("sas/a.txt".to_string(), b"hello".to_vec()),
            ("sas/d/b.bin".to_string(), bytes(5000, 7)),
        ]
    );

    // A leading `?`, as the portal copies it, is accepted too.
    f.write_datastores(
        &f.container,
        &endpoint(),
        &format!("sasToken: \"?{token}\""),
    );
    let again = f.cli(&[
        "upload",
        "--datastore",
        "blob",
        "--src-dir",
        f.path("src").to_str().unwrap(),
        "--target-path",
        "/sas",
        "--output",
        "json",
    ]);
    assert_exit(&again, 0);
    assert_eq!(summary(&again)["skipped"], 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn read_only_sas_cannot_upload_and_says_which_permission_is_missing() {
    let (f, src) = fixture_with_source().await;
    let token = sas(
        &f.container,
        Permissions {
            read: true,
            list: true,
            ..Default::default()
        },
    );
    f.write_datastores(&f.container, &endpoint(), &format!("sasToken: \"{token}\""));

    let up = f.cli(&upload_args(&src));
    assert_exit(&up, AUTH);
    let msg = error_sentence(&up);
    assert_mentions(
        &msg,
        &[
            "SAS token",
            "Secret default/creds",
            "not allowed",
            "permission",
            "write",
        ],
    );
    assert!(
        f.client.list("").await.unwrap().is_empty(),
        "nothing was uploaded"
    );

    // The same token reads: download of an empty container succeeds.
    let down = f.cli(&[
        "download",
        "--datastore",
        "blob",
        "--target-path",
        f.path("out").to_str().unwrap(),
    ]);
    assert_exit(&down, 0);
}

/// The controller gives upload-only references a SAS without read (`cwl`): a large upload,
/// which asks for the blocks an earlier run staged, still works with it (without resuming).
#[tokio::test(flavor = "multi_thread")]
async fn an_upload_only_sas_uploads_large_files() {
    let f = Fixture::new().await;
    write_tree(&f.path("src"), &[("big.bin", bytes(20 * 1024 * 1024, 3))]);
    let token = sas(
        &f.container,
        Permissions {
            create: true,
            write: true,
            list: true,
            ..Default::default()
        },
    );
    f.write_datastores(&f.container, &endpoint(), &format!("sasToken: \"{token}\""));
    let up = f.cli(&upload_args(f.path("src").to_str().unwrap()));
    assert_exit(&up, 0);
    let listed = f.client.list("").await.unwrap();
    assert_eq!((listed.len(), listed[0].size), (1, 20 * 1024 * 1024));
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_string_works_without_an_endpoint_in_the_spec() {
    let f = Fixture::new().await;
    let port = azurite_port();
    write(
        &f,
        &format!(
            r#"apiVersion: datastore.dev/v1alpha1
kind: Datastore
metadata: {{name: blob}}
spec:
  azureBlob:
    accountName: {ACCOUNT}
    containerName: {container}
    credentials: {{secretRef: {{name: creds}}}}
---
apiVersion: v1
kind: Secret
metadata: {{name: creds}}
stringData:
  connectionString: "DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={KEY};BlobEndpoint=http://127.0.0.1:{port}/{ACCOUNT};"
"#,
            container = f.container
        ),
    );
    write_tree(
        &f.path("src"),
        &[("c.txt", b"via connection string".to_vec())],
    );
    let up = f.cli(&[
        "upload",
        "--datastore",
        "blob",
        "--src-dir",
        f.path("src").to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert_exit(&up, 0);
    assert_eq!(summary(&up)["transferred"], 1);
    let listed = f.client.list("").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].name, "c.txt");

    let down = f.cli(&[
        "download",
        "--datastore",
        "blob",
        "--target-path",
        f.path("out").to_str().unwrap(),
    ]);
    assert_exit(&down, 0);
    assert_eq!(
        std::fs::read(f.path("out/c.txt")).unwrap(),
        b"via connection string"
    );
}

// 7. Credentials never appear in output or logs --------------------------------------------

/// Runs upload and download at `--log-level trace` (text and JSON output) and asserts that no
/// form of any `secrets` appears on stdout or stderr. Returns the outputs' exit codes.
fn assert_no_leak(f: &Fixture, src: &str, secrets: &[String]) -> Vec<i32> {
    let out = f.path("out");
    let runs: Vec<Vec<&str>> = vec![
        vec![
            "upload",
            "--datastore",
            "blob",
            "--src-dir",
            src,
            "--target-path",
            "leak",
        ],
        vec![
            "upload",
            "--datastore",
            "blob",
            "--src-dir",
            src,
            "--target-path",
            "leak",
            "--overwrite",
            "--output",
            "json",
        ],
        vec![
            "download",
            "--datastore",
            "blob",
            "--target-path",
            out.to_str().unwrap(),
            "--overwrite",
        ],
        vec![
            "download",
            "--datastore",
            "blob",
            "--target-path",
            out.to_str().unwrap(),
            "--output",
            "json",
        ],
    ];
    let mut codes = Vec::new();
    for args in runs {
        // A short budget: the unreachable cases need not wait minutes to fail.
        let o = f.cli(&with(
            args.clone(),
            &["--log-level", "trace", "--retry-budget", "1s"],
        ));
        let text = format!("{}\n{}", stdout(&o), stderr(&o));
        // The run really logged at trace level (so the check means something).
        assert!(
            text.contains("TRACE") || text.contains("DEBUG"),
            "trace logging is on for {args:?}: {text}"
        );
        for s in secrets {
            assert!(
                !text.contains(s.as_str()),
                "{args:?} leaked a credential ({s:?}) in:\n{text}"
            );
        }
        codes.push(o.status.code().unwrap_or(-1));
    }
    codes
}

/// The forms a secret can take in a log line: as is, URL-encoded, URL-decoded.
fn forms(secret: &str) -> Vec<String> {
    let enc: String = url::form_urlencoded::byte_serialize(secret.as_bytes()).collect();
    let dec = percent_encoding::percent_decode_str(secret)
        .decode_utf8_lossy()
        .into_owned();
    let mut v = vec![secret.to_string(), enc, dec];
    v.sort();
    v.dedup();
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn account_key_never_appears_in_output_at_trace_level() {
    let (f, src) = fixture_with_source().await;
    let secrets = forms(KEY);
    // Success.
    assert_eq!(assert_no_leak(&f, &src, &secrets), vec![0, 0, 0, 0]);
    // Failure: a container that does not exist.
    f.write_datastores(
        &unique_container(),
        &endpoint(),
        &format!("accountKey: {KEY}"),
    );
    assert_eq!(assert_no_leak(&f, &src, &secrets), vec![NOT_FOUND; 4]);
    // Failure: an unreachable endpoint (retries are logged).
    let dead = format!("http://127.0.0.1:{}/{ACCOUNT}", free_port());
    f.write_datastores(&f.container, &dead, &format!("accountKey: {KEY}"));
    assert_eq!(assert_no_leak(&f, &src, &secrets), vec![UNREACHABLE; 4]);
    // The key inside a connection string.
    let cs = format!(
        "connectionString: \"AccountName={ACCOUNT};AccountKey={KEY};BlobEndpoint={}\"",
        endpoint()
    );
    f.write_datastores(&unique_container(), &endpoint(), &cs);
    assert_eq!(assert_no_leak(&f, &src, &secrets), vec![NOT_FOUND; 4]);
}

#[tokio::test(flavor = "multi_thread")]
async fn sas_signature_never_appears_in_output_at_trace_level() {
    let (f, src) = fixture_with_source().await;
    let token = sas(&f.container, RACWL);
    let sig = token
        .split('&')
        .find_map(|kv| kv.strip_prefix("sig="))
        .expect("the token has a signature")
        .to_string();
    let mut secrets = forms(&sig);
    secrets.extend(forms(&token));
    // Success.
    f.write_datastores(&f.container, &endpoint(), &format!("sasToken: \"{token}\""));
    assert_eq!(assert_no_leak(&f, &src, &secrets), vec![0, 0, 0, 0]);
    // Failure: the token is for another container than the one the datastore names.
    f.write_datastores(
        &unique_container(),
        &endpoint(),
        &format!("sasToken: \"{token}\""),
    );
    let codes = assert_no_leak(&f, &src, &secrets);
    assert!(
        codes.iter().all(|c| *c == AUTH || *c == NOT_FOUND),
        "{codes:?}"
    );
    // Failure: unreachable, with retries logged.
    let dead = format!("http://127.0.0.1:{}/{ACCOUNT}", free_port());
    f.write_datastores(&f.container, &dead, &format!("sasToken: \"{token}\""));
    assert_eq!(assert_no_leak(&f, &src, &secrets), vec![UNREACHABLE; 4]);
    // Failure: a read-only token refused on upload.
    let ro = sas(
        &f.container,
        Permissions {
            read: true,
            list: true,
            ..Default::default()
        },
    );
    let ro_sig = ro
        .split('&')
        .find_map(|kv| kv.strip_prefix("sig="))
        .unwrap()
        .to_string();
    f.write_datastores(&f.container, &endpoint(), &format!("sasToken: \"{ro}\""));
    let codes = assert_no_leak(&f, &src, &forms(&ro_sig));
    // The first upload skips what the successful run put there; the --overwrite one is refused.
    assert_eq!(codes[..2], [0, AUTH]);
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_secret_is_reported_without_quoting_its_values() {
    let (f, src) = fixture_with_source().await;
    let secret = "Zm9vYmFyU2VjcmV0S2V5VmFsdWU=";
    let secret_docs = [
        // A block scalar where a map belongs: the parser would quote the whole string.
        format!("stringData: |\n  accountKey: {secret}\n"),
        // `data` values must be base64 strings; a number is quoted by the parser too.
        "data:\n  accountKey: 1234567890123\n".to_string(),
        format!("data:\n  accountKey: \"{secret} not base64\"\n"),
    ];
    for doc in secret_docs {
        let text = format!(
            "apiVersion: datastore.dev/v1alpha1\nkind: Datastore\nmetadata: {{name: blob}}\nspec: {{azureBlob: {{accountName: {ACCOUNT}, containerName: {c}, endpoint: '{e}', credentials: {{secretRef: {{name: creds}}}}}}}}\n---\napiVersion: v1\nkind: Secret\nmetadata: {{name: creds}}\n{doc}",
            c = f.container,
            e = endpoint()
        );
        write(&f, &text);
        for level in ["warn", "trace"] {
            let up = f.cli(&with(upload_args(&src), &["--log-level", level]));
            assert_exit(&up, CONFIG);
            let all = format!("{}{}", stdout(&up), stderr(&up));
            for leaked in [secret, "1234567890123"] {
                assert!(!all.contains(leaked), "{doc:?} leaked {leaked:?}: {all}");
            }
            if level == "warn" {
                assert_mentions(
                    &error_sentence(&up),
                    &[
                        "document 2",
                        "(Secret) is malformed",
                        "stringData",
                        "base64",
                        "fix it",
                    ],
                );
            }
        }
    }
}

// 8. The same errors as JSON ---------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
async fn errors_come_out_as_json_with_the_same_exit_code_and_message() {
    let (f, src) = fixture_with_source().await;

    // A configuration error found before any request (unknown datastore name)...
    let args = vec!["upload", "--datastore", "nope", "--src-dir", &src];
    let text = f.cli(&args);
    let json = f.cli(&with(args, &["--output", "json"]));
    assert_exit(&text, CONFIG);
    assert_exit(&json, CONFIG);
    let (reason, message) = json_error(&json);
    assert_eq!(reason, "InvalidConfig");
    assert_eq!(message, error_sentence(&text));
    assert!(
        stderr(&json).trim().is_empty(),
        "JSON mode keeps stderr clean: {}",
        stderr(&json)
    );

    // ...and one the service reports (missing container).
    f.write_datastores(
        &unique_container(),
        &endpoint(),
        &format!("accountKey: {KEY}"),
    );
    let args = upload_args(&src);
    let text = f.cli(&args);
    let json = f.cli(&with(args, &["--output", "json"]));
    assert_exit(&text, NOT_FOUND);
    assert_exit(&json, NOT_FOUND);
    let (reason, message) = json_error(&json);
    assert_eq!(reason, "NotFound");
    assert_eq!(message, error_sentence(&text));
    assert_mentions(&message, &["create it"]);
    // The summary fields are still there, so scripts can read what was done.
    assert_eq!(summary(&json)["transferred"], 0);

    // ...and an auth error on download.
    let token = sas(
        &f.container,
        Permissions {
            read: true,
            ..Default::default()
        },
    );
    f.write_datastores(&f.container, &endpoint(), &format!("sasToken: \"{token}\""));
    let json = f.cli(&[
        "download",
        "--datastore",
        "blob",
        "--target-path",
        f.path("out").to_str().unwrap(),
        "--output",
        "json",
    ]);
    assert_exit(&json, AUTH);
    assert_eq!(json_error(&json).0, "AuthFailed");
}

/// A machine or image without CA certificates (an image built FROM scratch without them) is a
/// configuration error saying what is missing, not a panic.
#[test]
fn no_ca_certificates_is_a_config_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("datastores.yaml");
    std::fs::write(
        &file,
        "apiVersion: datastore.dev/v1alpha1\nkind: Datastore\nmetadata: {name: ds}\nspec:\n  azureBlob: {accountName: mlstorage, containerName: data}\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_datastore"))
        .args(["download", "--datastores", file.to_str().unwrap()])
        .args(["--datastore", "ds", "--prefix", "p", "--target-path"])
        .arg(dir.path().join("out"))
        .env_remove("DATASTORE_CONFIG")
        // Where rustls looks for the system's certificates: nowhere.
        .env("SSL_CERT_FILE", "/nonexistent")
        .env("SSL_CERT_DIR", "/nonexistent")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The TLS library warns about each place it looked first; the error is the last line.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let msg = stderr.lines().last().unwrap_or_default();
    assert!(msg.starts_with("error: "), "{stderr}");
    assert_mentions(msg, &["cannot set up HTTPS", "CA certificates"]);
}
