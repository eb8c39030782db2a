//! Test harness: a real Azurite on a free loopback port, one per test binary, and helpers to
//! run the `datastore` binary against it.
#![allow(dead_code)]

pub mod apiserver;
pub mod cel;
pub mod cluster;
pub mod csi;
pub mod cut;
pub mod image;
pub mod node;
pub mod objects;
pub mod operator;
pub mod proxy;
pub mod real_node;
pub mod restartable;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use datastore_operator::store::azure::Tuning;
use datastore_operator::store::sas::{Permissions, container_sas};
use datastore_operator::store::{AzureBlobConfig, AzureCredential, BlobClient, Secret};

/// Azurite's well-known development account (public, documented).
pub const ACCOUNT: &str = "devstoreaccount1";
pub const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

static AZURITE: OnceLock<u16> = OnceLock::new();

/// The port of this test binary's Azurite, started on first use.
pub fn azurite_port() -> u16 {
    *AZURITE.get_or_init(start_azurite)
}

fn azurite_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("AZURITE_BLOB_BIN") {
        return bin.into();
    }
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/node_modules/.bin/azurite-blob");
    assert!(
        bin.exists(),
        "Azurite is not installed at {}: run `make test` (it installs it) or `npm install --prefix .tools azurite`",
        bin.display()
    );
    bin
}

/// Azurite on 127.0.0.1:`port`, killed when the thread that spawns it exits
/// (PR_SET_PDEATHSIG); the caller says where it keeps its data.
fn azurite_command(port: u16) -> Command {
    let mut cmd = Command::new(azurite_bin());
    cmd.args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
        .args([
            "--disableTelemetry",
            "--skipApiVersionCheck",
            "--loose",
            "--silent",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd
}

fn start_azurite() -> u16 {
    let port = free_port();
    let (tx, rx) = std::sync::mpsc::channel();
    // The child is spawned and awaited by a thread that lives as long as the test process, and
    // is killed with it.
    std::thread::spawn(move || {
        let mut child = azurite_command(port)
            .arg("--inMemoryPersistence")
            .spawn()
            .expect("Azurite starts");
        tx.send(()).unwrap();
        let _ = child.wait();
    });
    rx.recv().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "Azurite did not listen on 127.0.0.1:{port} within 60s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    port
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn endpoint() -> String {
    format!("http://127.0.0.1:{}/{ACCOUNT}", azurite_port())
}

/// A fresh container name, unique within this test run.
pub fn unique_container() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "t{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn client_with(container: &str, credential: AzureCredential) -> BlobClient {
    let cfg = AzureBlobConfig {
        account: ACCOUNT.into(),
        container: container.into(),
        endpoint: endpoint().parse().unwrap(),
        credential,
        credential_source: "test".into(),
        read_only: false,
    };
    BlobClient::new(cfg, Tuning::default()).unwrap()
}

pub fn client(container: &str) -> BlobClient {
    client_with(container, AzureCredential::AccountKey(Secret::new(KEY)))
}

/// A SAS token for `container` with `permissions`, valid for an hour.
pub fn sas(container: &str, permissions: Permissions) -> String {
    container_sas(
        ACCOUNT,
        KEY,
        container,
        permissions,
        chrono::Utc::now() + chrono::Duration::hours(1),
    )
    .expect("the development key is base64")
}

/// Only list (`l`): the blobs' names and properties, never their contents.
pub const LIST_ONLY: Permissions = Permissions {
    read: false,
    add: false,
    create: false,
    write: false,
    delete: false,
    list: true,
};

/// Read and list (`rl`): what a download needs.
pub const READ_LIST: Permissions = Permissions {
    read: true,
    ..LIST_ONLY
};

/// A scratch directory with a container of its own and a datastores file naming it `blob`
/// (and `local`, a local datastore in `<dir>/localstore`).
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub container: String,
    pub client: BlobClient,
}

impl Fixture {
    pub async fn new() -> Fixture {
        Fixture::with_secret(&format!("accountKey: {KEY}")).await
    }

    /// `secret_line` is the Secret's `stringData` entry, e.g. `sasToken: ...`.
    pub async fn with_secret(secret_line: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let container = unique_container();
        let client = client(&container);
        client.create_container().await.unwrap();
        std::fs::create_dir_all(dir.path().join("localstore")).unwrap();
        let fixture = Fixture {
            dir,
            container,
            client,
        };
        fixture.write_datastores(&fixture.container, &endpoint(), secret_line);
        fixture
    }

    pub fn write_datastores(&self, container: &str, endpoint: &str, secret_line: &str) {
        std::fs::write(
            self.datastores(),
            datastores_yaml(container, endpoint, secret_line),
        )
        .unwrap();
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn datastores(&self) -> PathBuf {
        self.path("datastores.yaml")
    }

    /// Runs `datastore <args> --datastores <file> --no-progress`.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut all: Vec<&str> = args.to_vec();
        let ds = self.datastores();
        all.extend(["--datastores", ds.to_str().unwrap(), "--no-progress"]);
        datastore(&all)
    }
}

/// A datastores file: Datastore `blob` on `container` at `endpoint` with the Secret entry
/// `secret_line` (e.g. `sasToken: ...`), and `local`, a local datastore in `localstore`.
pub fn datastores_yaml(container: &str, endpoint: &str, secret_line: &str) -> String {
    format!(
        r#"apiVersion: datastore.dev/v1alpha1
kind: Datastore
metadata: {{name: blob}}
spec:
  azureBlob:
    accountName: {ACCOUNT}
    containerName: {container}
    endpoint: {endpoint}
    credentials: {{secretRef: {{name: creds}}}}
---
apiVersion: v1
kind: Secret
metadata: {{name: creds}}
stringData:
  {secret_line}
---
apiVersion: datastore.dev/v1alpha1
kind: Datastore
metadata: {{name: local}}
spec:
  local: {{path: localstore}}
"#
    )
}

pub fn datastore(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_datastore"))
        .args(args)
        .env_remove("DATASTORE_CONFIG")
        .output()
        .unwrap()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The parsed `--output json` summary.
pub fn summary(o: &Output) -> serde_json::Value {
    let out = stdout(o);
    serde_json::from_str(out.trim().lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("no JSON summary ({e}) in {out:?}; stderr: {}", stderr(o)))
}

#[track_caller]
pub fn assert_exit(o: &Output, code: i32) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "exit code; stdout: {}\nstderr: {}",
        stdout(o),
        stderr(o)
    );
}

/// Writes `files` (relative path, contents) under `root`.
pub fn write_tree(root: &Path, files: &[(&str, Vec<u8>)]) {
    for (rel, data) in files {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }
}

/// Every file below `root` as (relative path, contents), sorted.
pub fn read_tree(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                walk(root, &p, out);
            } else {
                out.push((
                    p.strip_prefix(root).unwrap().to_str().unwrap().to_string(),
                    std::fs::read(&p).unwrap(),
                ));
            }
        }
    }
    if root.exists() {
        walk(root, root, &mut out);
    }
    out.sort();
    out
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn md5(data: &[u8]) -> [u8; 16] {
    use md5::Digest;
    md5::Md5::digest(data).into()
}

/// A scripted HTTP server on 127.0.0.1 standing in for a blob endpoint that misbehaves (hostile
/// names, throttling, a blob replaced between two reads): things Azurite cannot be made to do.
/// Answers `handler(request)` and records every request line.
pub struct FakeServer {
    pub port: u16,
    pub requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// The most requests that were being answered at the same time.
    pub max_in_flight: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

pub type Handler =
    std::sync::Arc<dyn Fn(&Request) -> (u16, Vec<(String, String)>, Vec<u8>) + Send + Sync>;

/// One request as the handler sees it.
pub struct Request {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
}

impl Request {
    /// The byte range `start..end` of a ranged read (`x-ms-range: bytes=a-b`).
    pub fn range(&self) -> (usize, usize) {
        let range = self.header("x-ms-range").expect("a ranged read");
        range
            .trim_start_matches("bytes=")
            .split_once('-')
            .map(|(s, e)| (s.parse::<usize>().unwrap(), e.parse::<usize>().unwrap() + 1))
            .expect("bytes=a-b")
    }

    /// The value of header `name` (case-insensitive), if sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl FakeServer {
    pub async fn start(handler: Handler) -> FakeServer {
        FakeServer::start_with_delay(handler, Duration::ZERO).await
    }

    /// Each answer is held back by `delay`, so concurrent requests overlap measurably.
    pub async fn start_with_delay(handler: Handler, delay: Duration) -> FakeServer {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = requests.clone();
        let max_in_flight = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (max, in_flight) = (
            max_in_flight.clone(),
            std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        );
        tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    return;
                };
                let (handler, log, max, in_flight) =
                    (handler.clone(), log.clone(), max.clone(), in_flight.clone());
                tokio::spawn(async move {
                    let (read, mut write) = socket.into_split();
                    let mut reader = BufReader::new(read);
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let mut len = 0usize;
                        let mut headers = Vec::new();
                        loop {
                            let mut h = String::new();
                            if reader.read_line(&mut h).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if h == "\r\n" {
                                break;
                            }
                            if let Some((k, v)) = h.split_once(':') {
                                if k.eq_ignore_ascii_case("content-length") {
                                    len = v.trim().parse().unwrap_or(0);
                                }
                                headers.push((k.to_string(), v.trim().to_string()));
                            }
                        }
                        let mut body = vec![0; len];
                        if reader.read_exact(&mut body).await.is_err() {
                            return;
                        }
                        let mut parts = line.split_whitespace();
                        let request = Request {
                            method: parts.next().unwrap_or("").to_string(),
                            target: parts.next().unwrap_or("").to_string(),
                            headers,
                        };
                        log.lock()
                            .unwrap()
                            .push(format!("{} {}", request.method, request.target));
                        let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                        max.fetch_max(now, Ordering::SeqCst);
                        tokio::time::sleep(delay).await;
                        let (status, headers, body) = handler(&request);
                        in_flight.fetch_sub(1, Ordering::SeqCst);
                        let mut resp =
                            format!("HTTP/1.1 {status} X\r\ncontent-length: {}\r\n", body.len());
                        for (k, v) in headers {
                            resp.push_str(&format!("{k}: {v}\r\n"));
                        }
                        resp.push_str("\r\n");
                        if write.write_all(resp.as_bytes()).await.is_err()
                            || write.write_all(&body).await.is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        FakeServer {
            port,
            requests,
            max_in_flight,
        }
    }

    /// A blob endpoint that answers every listing with `listing` and every other request with
    /// `body`, each after `delay`.
    pub async fn listing(listing: Vec<u8>, body: Vec<u8>, delay: Duration) -> FakeServer {
        FakeServer::start_with_delay(
            std::sync::Arc::new(move |request: &Request| {
                if request.target.contains("comp=list") {
                    (200, vec![], listing.clone())
                } else {
                    (200, vec![], body.clone())
                }
            }),
            delay,
        )
        .await
    }

    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

/// The headers of a service error answer with this `x-ms-error-code`.
pub fn error_code(code: &str) -> Vec<(String, String)> {
    vec![("x-ms-error-code".to_string(), code.to_string())]
}

/// A List Blobs response body for `(name, size, encoded)` entries.
pub fn listing_xml(blobs: &[(&str, u64, bool)]) -> Vec<u8> {
    let mut xml =
        String::from(r#"<?xml version="1.0" encoding="utf-8"?><EnumerationResults><Blobs>"#);
    for (name, size, encoded) in blobs {
        let name_el = if *encoded {
            format!(r#"<Name Encoded="true">{name}</Name>"#)
        } else {
            format!("<Name>{name}</Name>")
        };
        xml.push_str(&format!(
            "<Blob>{name_el}<Properties><Content-Length>{size}</Content-Length></Properties></Blob>"
        ));
    }
    xml.push_str("</Blobs><NextMarker /></EnumerationResults>");
    xml.into_bytes()
}

/// A datastores file naming `fake`: an anonymous datastore at a scripted endpoint on `port`.
pub fn fake_datastores(dir: &Path, port: u16) -> PathBuf {
    let path = dir.join("fake.yaml");
    std::fs::write(
        &path,
        format!(
            "apiVersion: datastore.dev/v1alpha1\nkind: Datastore\nmetadata: {{name: fake}}\nspec:\n  azureBlob:\n    accountName: {ACCOUNT}\n    containerName: data\n    endpoint: http://127.0.0.1:{port}/{ACCOUNT}\n"
        ),
    )
    .unwrap();
    path
}

/// The digest an agent download reports, computed here independently of the agent from the
/// issue's definition: sha256 over the sorted lines `<name>\t<size>\t<content-md5 hex>\n`.
pub fn expected_digest(files: &[(&str, &[u8])]) -> String {
    use sha2::Digest;
    let mut lines: Vec<String> = files
        .iter()
        .map(|(name, data)| {
            let hex: String = md5(data).iter().map(|b| format!("{b:02x}")).collect();
            format!("{name}\t{}\t{hex}\n", data.len())
        })
        .collect();
    lines.sort();
    let hash = sha2::Sha256::digest(lines.concat().as_bytes());
    format!(
        "sha256:{}",
        hash.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// The values of a Secret as JSON (`data`, base64, decoded to text): what its readers see.
pub fn secret_values(secret: &serde_json::Value) -> std::collections::BTreeMap<String, String> {
    use base64::Engine;
    let data = secret["data"]
        .as_object()
        .unwrap_or_else(|| panic!("the Secret holds its values in data: {secret}"));
    data.iter()
        .map(|(k, v)| {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(v.as_str().expect("base64 text"))
                .expect("base64");
            (k.clone(), String::from_utf8(bytes).expect("text"))
        })
        .collect()
}
