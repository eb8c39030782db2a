//! A real Kubernetes control plane for the end-to-end tests: etcd, kube-apiserver,
//! kube-controller-manager and kube-scheduler of Kubernetes 1.30, built from Go modules by
//! `make test-deps` (tests/cluster, `.tools/k8s-<version>/kube`), started once per test binary
//! on free 127.0.0.1 ports with certificates made by openssl, token authentication,
//! `--authorization-mode=Node,RBAC` and the admission plugins a cluster runs (PodSecurity and
//! OwnerReferencesPermissionEnforcement among them). Every process dies with the test process
//! (PR_SET_PDEATHSIG); a run's directory is removed by the next run once its process is gone.
//! The same control plane can run elsewhere than on this machine's loopback: [`Place`] (the real
//! node's namespaces, tests/common/real_node.rs).

use std::ffi::OsStr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::free_port;

/// The Kubernetes release the tests run against, as tests/cluster/go.mod pins it (the oldest
/// minor the operator supports); the Makefile reads the same line.
pub fn kubernetes() -> String {
    let go_mod = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cluster/go.mod");
    std::fs::read_to_string(&go_mod)
        .unwrap()
        .lines()
        .find_map(|l| l.trim().strip_prefix("k8s.io/kubernetes "))
        .and_then(|v| v.split_whitespace().next())
        .expect("tests/cluster/go.mod requires k8s.io/kubernetes")
        .to_string()
}

/// The control plane of this test process.
pub struct Cluster {
    pub dir: PathBuf,
    /// The apiserver as this process reaches it.
    pub server: String,
    /// The apiserver's port where it runs (the same as `server`'s on this machine).
    pub api_port: u16,
    pub ca: PathBuf,
    /// A `system:masters` token: the admin's.
    pub admin_token: String,
}

/// Where the control plane's processes run and how this process reaches them.
pub trait Place {
    /// A command that runs `program` there.
    fn command(&self, program: &OsStr) -> Command;
    /// What the apiserver binds and advertises, and anything else it needs there; asked once
    /// the CA is in `pki`.
    fn apiserver_args(&self, pki: &Path) -> Vec<String>;
    /// The apiserver's serving certificate's subjectAltNames beside 127.0.0.1 and the
    /// `kubernetes` Service's.
    fn apiserver_names(&self) -> Vec<String>;
    /// The port on 127.0.0.1 of this machine that reaches `port` on 127.0.0.1 there.
    fn reach(&self, port: u16) -> u16;
}

/// This machine's loopback, as every e2e test but the real node's runs it.
pub struct Loopback;

impl Place for Loopback {
    fn command(&self, program: &OsStr) -> Command {
        Command::new(program)
    }
    fn apiserver_args(&self, _: &Path) -> Vec<String> {
        vec![
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
        ]
    }
    fn apiserver_names(&self) -> Vec<String> {
        Vec::new()
    }
    fn reach(&self, port: u16) -> u16 {
        port
    }
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();

/// The control plane, started on first use.
pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| {
        let root = std::env::temp_dir();
        sweep(&root);
        start(
            &Loopback,
            &root.join(format!("datastore-e2e-{}", std::process::id())),
        )
    })
}

/// The `kube` binary `make test-deps` builds.
pub fn kube_bin() -> PathBuf {
    let bin = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".tools")
        .join(format!("k8s-{}", kubernetes()))
        .join("kube");
    assert!(
        bin.exists(),
        "{} is missing: run `make test-deps` (it builds the control plane from tests/cluster with Go, about 7 minutes the first time)",
        bin.display()
    );
    bin
}

/// Spawns `cmd` from a thread that lives as long as the test process; the child is killed
/// when that thread ends (the process exits). Its output goes to `log`. Returns its pid.
pub fn spawn_logged(mut cmd: Command, log: &Path) -> u32 {
    let out = std::fs::File::create(log).unwrap();
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let name = format!("{:?}", cmd.get_program());
    std::thread::spawn(move || {
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("start {name}: {e}"));
        tx.send(child.id()).unwrap();
        let _ = child.wait();
    });
    rx.recv().unwrap()
}

pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs (apt install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Signs the request `csr` in `pki` with its CA, with the extensions in file `ext`, into `crt`
/// (valid two days: a test run's).
pub fn sign(pki: &Path, csr: &str, ext: &str, crt: &str) {
    openssl(
        pki,
        &[
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-sha256",
            "-extfile",
            ext,
            "-out",
            crt,
        ],
    );
}

/// A CA, the apiserver's serving certificate for 127.0.0.1 and `names`, and the
/// service-account key pair.
fn certificates(pki: &Path, names: &[String]) {
    std::fs::create_dir_all(pki).unwrap();
    openssl(
        pki,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-sha256",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-subj",
            "/CN=datastore-e2e-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,digitalSignature,keyEncipherment,keyCertSign",
        ],
    );
    openssl(
        pki,
        &[
            "req",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "apiserver.key",
            "-out",
            "apiserver.csr",
            "-subj",
            "/CN=kube-apiserver",
        ],
    );
    let names: String = names.iter().map(|n| format!(",{n}")).collect();
    std::fs::write(
        pki.join("apiserver.ext"),
        format!("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes.default.svc{names}\n"),
    )
    .unwrap();
    sign(pki, "apiserver.csr", "apiserver.ext", "apiserver.crt");
    openssl(pki, &["genrsa", "-out", "sa.key", "2048"]);
    openssl(pki, &["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"]);
}

/// A kubeconfig for `server` authenticating with `token`.
pub fn kubeconfig(path: &Path, server: &str, ca: &Path, token: &str) {
    std::fs::write(
        path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: {server}\n    certificate-authority: {}\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: e2e\n  context: {{cluster: e2e, user: u}}\ncurrent-context: e2e\n",
            ca.display()
        ),
    )
    .unwrap();
}

/// Removes the directories of earlier runs whose process is gone.
fn sweep(root: &Path) {
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some(pid) = name
            .strip_prefix("datastore-e2e-")
            .and_then(|p| p.parse::<i32>().ok())
            && unsafe { libc::kill(pid, 0) } != 0
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Waits until `ready` or fails with the end of `log`; polled every 200 ms.
pub fn wait_until(what: &str, timeout: Duration, log: &Path, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        if Instant::now() > deadline {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            panic!(
                "{what} was not ready within {timeout:?}; the end of {}:\n{}",
                log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Whether `https://127.0.0.1:<port><path>` at `place` answers 200 (certificates not
/// checked: a probe).
fn healthy(place: &dyn Place, port: u16, path: &str, token: Option<&str>) -> bool {
    let mut cmd = place.command("curl".as_ref());
    cmd.args(["-ksf", "-o", "/dev/null", "--max-time", "2"]);
    if let Some(token) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    cmd.arg(format!("https://127.0.0.1:{port}{path}"))
        .stdin(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Starts the control plane at `place`, its files in `dir`.
pub fn start(place: &dyn Place, dir: &Path) -> Cluster {
    let started = Instant::now();
    let kube = kube_bin();
    let kube = kube.as_os_str();
    let dir = dir.to_path_buf();
    let _ = std::fs::remove_dir_all(&dir);
    let pki = dir.join("pki");
    certificates(&pki, &place.apiserver_names());
    let token = |user: &str| format!("{user}-{:x}", rand_u64());
    let admin_token = token("admin");
    let cm_token = token("cm");
    let sched_token = token("sched");
    std::fs::write(
        pki.join("tokens.csv"),
        format!(
            "{admin_token},e2e-admin,e2e-admin,\"system:masters\"\n{cm_token},system:kube-controller-manager,kcm,\n{sched_token},system:kube-scheduler,sched,\n"
        ),
    )
    .unwrap();

    let etcd_port = free_port();
    let mut etcd = place.command(kube);
    etcd.arg("etcd")
        .args(["--name", "e2e", "--data-dir"])
        .arg(dir.join("etcd"))
        .arg(format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"))
        .arg(format!(
            "--listen-peer-urls=http://127.0.0.1:{}",
            free_port()
        ))
        .arg("--unsafe-no-fsync");
    let _ = spawn_logged(etcd, &dir.join("etcd.log"));

    let api_port = free_port();
    let mut api = place.command(kube);
    api.arg("kube-apiserver")
        .arg(format!("--etcd-servers=http://127.0.0.1:{etcd_port}"))
        .args(place.apiserver_args(&pki))
        .arg(format!("--secure-port={api_port}"))
        .arg(format!("--tls-cert-file={}", pki.join("apiserver.crt").display()))
        .arg(format!("--tls-private-key-file={}", pki.join("apiserver.key").display()))
        .arg(format!("--client-ca-file={}", pki.join("ca.crt").display()))
        .arg(format!("--token-auth-file={}", pki.join("tokens.csv").display()))
        .arg("--authorization-mode=Node,RBAC")
        // Beside the default plugins: what AKS and most clusters also run.
        .arg("--enable-admission-plugins=NodeRestriction,PodSecurity,OwnerReferencesPermissionEnforcement")
        .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
        .arg(format!("--service-account-key-file={}", pki.join("sa.pub").display()))
        .arg(format!("--service-account-signing-key-file={}", pki.join("sa.key").display()))
        .args(["--service-cluster-ip-range=10.0.0.0/24", "--endpoint-reconciler-type=none"])
        .arg("--allow-privileged=true")
        .arg(format!("--cert-dir={}", dir.join("apiserver-certs").display()));
    let _ = spawn_logged(api, &dir.join("kube-apiserver.log"));
    wait_until(
        "kube-apiserver",
        Duration::from_secs(120),
        &dir.join("kube-apiserver.log"),
        || healthy(place, api_port, "/readyz", Some(&admin_token)),
    );
    // The components reach it where they run; this process perhaps through a forward.
    let local = format!("https://127.0.0.1:{api_port}");
    let server = format!("https://127.0.0.1:{}", place.reach(api_port));
    let ca = pki.join("ca.crt");

    let cm_config = dir.join("controller-manager.kubeconfig");
    kubeconfig(&cm_config, &local, &ca, &cm_token);
    let cm_port = free_port();
    let mut cm = place.command(kube);
    cm.arg("kube-controller-manager")
        .arg(format!("--kubeconfig={}", cm_config.display()))
        .arg(format!(
            "--authentication-kubeconfig={}",
            cm_config.display()
        ))
        .arg(format!(
            "--authorization-kubeconfig={}",
            cm_config.display()
        ))
        .arg("--bind-address=127.0.0.1")
        .arg(format!("--secure-port={cm_port}"))
        .args(["--leader-elect=false", "--controllers=*"])
        .arg("--use-service-account-credentials=true")
        .arg(format!(
            "--service-account-private-key-file={}",
            pki.join("sa.key").display()
        ))
        .arg(format!("--root-ca-file={}", ca.display()))
        .arg("--service-cluster-ip-range=10.0.0.0/24");
    let _ = spawn_logged(cm, &dir.join("kube-controller-manager.log"));

    let sched_config = dir.join("scheduler.kubeconfig");
    kubeconfig(&sched_config, &local, &ca, &sched_token);
    let sched_port = free_port();
    let mut sched = place.command(kube);
    sched
        .arg("kube-scheduler")
        .arg(format!("--kubeconfig={}", sched_config.display()))
        .arg(format!(
            "--authentication-kubeconfig={}",
            sched_config.display()
        ))
        .arg(format!(
            "--authorization-kubeconfig={}",
            sched_config.display()
        ))
        .arg("--bind-address=127.0.0.1")
        .arg(format!("--secure-port={sched_port}"))
        .arg("--leader-elect=false");
    let _ = spawn_logged(sched, &dir.join("kube-scheduler.log"));
    wait_until(
        "kube-controller-manager",
        Duration::from_secs(120),
        &dir.join("kube-controller-manager.log"),
        || healthy(place, cm_port, "/healthz", None),
    );
    wait_until(
        "kube-scheduler",
        Duration::from_secs(120),
        &dir.join("kube-scheduler.log"),
        || healthy(place, sched_port, "/healthz", None),
    );
    eprintln!(
        "control plane {} up on {server} in {:.1}s (logs in {})",
        kubernetes(),
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    Cluster {
        dir,
        server,
        api_port,
        ca,
        admin_token,
    }
}

fn rand_u64() -> u64 {
    let mut bytes = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .unwrap();
    u64::from_le_bytes(bytes)
}

impl Cluster {
    /// A kube client as `token`'s user.
    pub fn client_as(&self, token: &str) -> kube::Client {
        let path = self.dir.join(format!("client-{:x}.kubeconfig", rand_u64()));
        kubeconfig(&path, &self.server, &self.ca, token);
        let config = kube::config::Kubeconfig::read_from(&path).unwrap();
        let config = futures::executor::block_on(kube::Config::from_custom_kubeconfig(
            config,
            &kube::config::KubeConfigOptions::default(),
        ))
        .unwrap();
        kube::Client::try_from(config).unwrap()
    }

    /// The admin's client (`system:masters`).
    pub fn admin(&self) -> kube::Client {
        self.client_as(&self.admin_token)
    }
}
