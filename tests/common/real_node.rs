//! A real node beside a real control plane (issue 25): the kubelet of the same Kubernetes
//! release (in the `kube` binary of tests/cluster that `make test-deps` builds), Debian's
//! containerd and runc, the CNI bridge and host-local plugins, and kube-proxy (iptables
//! mode, so that pods reach Services), with etcd, the apiserver,
//! the controller manager and the scheduler (tests/common/cluster.rs), all inside mount, network
//! and PID namespaces of their own (tests/cluster/node/ns-init.sh): nothing they serve or mount
//! reaches this machine, whose loopback sees only the apiserver, through a forward. The kubelet
//! registers with its own client certificate (`system:node:<name>`), so the Node authorizer and
//! NodeRestriction judge it; the apiserver reaches it at its InternalIP with a client
//! certificate of its own, as `pods/log` needs. Images are built here and imported
//! (tests/cluster/node/images.sh): a static pause and a busybox stand-in; nothing is pulled.
//!
//! Teardown ends the namespaces' PID 1, so the kernel kills every process in them (kubelet,
//! containerd, shims, containers) and their mounts and network go with them; then the node's
//! cgroups are removed. A test process that dies takes the namespaces with it (`unshare
//! --kill-child` under PR_SET_PDEATHSIG); the next run removes what is left of it (its
//! directory, its cgroups).

use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::api::Api;

use super::cluster::{self, Cluster, Place, wait_until};

/// The node's name.
pub const NODE: &str = "e2e-node";
/// The node's address, on a bridge inside the namespaces (its InternalIP).
pub const NODE_IP: &str = "10.10.0.1";
/// The pods' addresses, from the CNI host-local plugin.
pub const POD_SUBNET: &str = "10.244.0.0/24";
/// The sandbox image, built here (tests/cluster/node/pause.c).
pub const PAUSE_IMAGE: &str = "localhost/pause:e2e";
/// The stand-in for users' images: busybox (`sh` and its applets).
pub const STANDIN_IMAGE: &str = "localhost/standin:e2e";

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cluster/node")
}

/// The cgroup v1 hierarchies (and the unified one of a hybrid machine) the kubelet and runc
/// create cgroups in.
fn hierarchies() -> Vec<PathBuf> {
    std::fs::read_dir("/sys/fs/cgroup")
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("cgroup.procs").exists())
        .collect()
}

/// Removes `path` and the cgroups under it, deepest first; what could not be removed.
fn remove_cgroup(path: &Path) -> Vec<PathBuf> {
    let mut left = Vec::new();
    for child in std::fs::read_dir(path).into_iter().flatten().flatten() {
        if child.file_type().is_ok_and(|t| t.is_dir()) {
            left.extend(remove_cgroup(&child.path()));
        }
    }
    if path.exists() && std::fs::remove_dir(path).is_err() {
        left.push(path.to_path_buf());
    }
    left
}

/// The host pid of `pid`'s only child.
fn only_child(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn alive(pid: u32) -> bool {
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

/// Removes what runs of test processes that are gone left: their directories and cgroups.
fn sweep(root: &Path) {
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some(pid) = name
            .strip_prefix("datastore-node-")
            .and_then(|p| p.split('-').next()?.parse::<u32>().ok())
            && !alive(pid)
        {
            for h in hierarchies() {
                remove_cgroup(&h.join(&name));
            }
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A certificate signed by the cluster's CA in `pki`, for a client with `subject`.
fn client_certificate(pki: &Path, name: &str, subject: &str) -> (PathBuf, PathBuf) {
    let (key, crt) = (format!("{name}.key"), format!("{name}.crt"));
    let csr = format!("{name}.csr");
    cluster::openssl(
        pki,
        &[
            "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj",
            subject,
        ],
    );
    std::fs::write(
        pki.join("client.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    cluster::sign(pki, &csr, "client.ext", &crt);
    (pki.join(key), pki.join(crt))
}

/// A kubeconfig for a component inside the namespaces, with a client certificate.
fn client_kubeconfig(path: &Path, cluster: &Cluster, crt: &Path, key: &Path) {
    std::fs::write(
        path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: https://127.0.0.1:{port}\n    certificate-authority: {ca}\nusers:\n- name: component\n  user:\n    client-certificate: {crt}\n    client-key: {key}\ncontexts:\n- name: e2e\n  context: {{cluster: e2e, user: component}}\ncurrent-context: e2e\n",
            port = cluster.api_port,
            ca = cluster.ca.display(),
            crt = crt.display(),
            key = key.display(),
        ),
    )
    .unwrap();
}

/// The namespaces: `unshare` (this process's child) and their PID 1 (its child).
struct Namespaces {
    unshare: u32,
    init: u32,
    /// `pid:[…]`, `net:[…]`, `mnt:[…]` of the namespaces, to find anything left in them.
    ids: Vec<String>,
    /// Forwards from this machine's loopback into the namespaces, stopped at teardown.
    forwards: std::sync::Mutex<Vec<Forward>>,
}

impl Namespaces {
    fn start(dir: &Path, log: &Path) -> Namespaces {
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--mount",
            "--net",
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
            "--propagation",
            "private",
        ])
        .arg(scripts().join("ns-init.sh"))
        .arg(dir)
        .arg(format!("{NODE_IP}/24"));
        let unshare = cluster::spawn_logged(cmd, log);
        wait_until("the namespaces", Duration::from_secs(20), log, || {
            dir.join("ns-ready").exists() && only_child(unshare).is_some()
        });
        let init = only_child(unshare).unwrap();
        let ids = ["pid", "net", "mnt"]
            .iter()
            .map(|k| {
                std::fs::read_link(format!("/proc/{init}/ns/{k}"))
                    .unwrap()
                    .to_string_lossy()
                    .to_string()
            })
            .collect();
        Namespaces {
            unshare,
            init,
            ids,
            forwards: Default::default(),
        }
    }

    /// Host pids of the processes still in the namespaces.
    fn processes(&self) -> Vec<u32> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            let inside = ["pid", "net", "mnt"].iter().any(|k| {
                std::fs::read_link(format!("/proc/{pid}/ns/{k}"))
                    .is_ok_and(|l| self.ids.contains(&l.to_string_lossy().to_string()))
            });
            if inside {
                found.push(pid);
            }
        }
        found
    }
}

impl Place for Namespaces {
    fn command(&self, program: &OsStr) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.init.to_string(), "-m", "-n", "-p", "--"])
            .arg(program);
        cmd
    }

    fn apiserver_args(&self, pki: &Path) -> Vec<String> {
        // What it shows the kubelet for logs, exec and port-forward (all of it: a master).
        let (key, crt) = client_certificate(
            pki,
            "apiserver-kubelet-client",
            "/O=system:masters/CN=kube-apiserver-kubelet-client",
        );
        vec![
            // Every address of the namespaces: its loopback and the node's, where pods reach it.
            "--bind-address=0.0.0.0".into(),
            format!("--advertise-address={NODE_IP}"),
            // The node's name resolves nowhere in here: dial its address.
            "--kubelet-preferred-address-types=InternalIP".into(),
            format!("--kubelet-client-certificate={}", crt.display()),
            format!("--kubelet-client-key={}", key.display()),
        ]
    }

    fn apiserver_names(&self) -> Vec<String> {
        vec![format!("IP:{NODE_IP}")]
    }

    fn reach(&self, port: u16) -> u16 {
        let forward = Forward::start(self.init, port);
        let local = forward.port;
        self.forwards.lock().unwrap().push(forward);
        local
    }
}

/// A TCP forward from 127.0.0.1 of this machine to 127.0.0.1 inside the namespaces.
struct Forward {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl Forward {
    fn start(init: u32, target: u16) -> Forward {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let netns = File::open(format!("/proc/{init}/ns/net")).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            // A socket belongs to the network namespace of the thread that makes it: this one
            // accepts on the machine's loopback (made before) and connects from inside.
            assert_eq!(
                unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) },
                0,
                "setns into the node's network namespace"
            );
            for client in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    return;
                }
                let (Ok(client), Ok(upstream)) =
                    (client, TcpStream::connect(("127.0.0.1", target)))
                else {
                    continue;
                };
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), upstream.try_clone().unwrap()),
                    (upstream, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        Forward { port, stop }
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// What a teardown left on this machine; empty when it left nothing.
#[derive(Debug, Default, PartialEq)]
pub struct Leftovers {
    /// Host pids still in the node's namespaces.
    pub processes: Vec<u32>,
    /// Lines of this machine's mount table naming the node's directory.
    pub mounts: Vec<String>,
    /// The node's cgroups that still exist.
    pub cgroups: Vec<PathBuf>,
}

/// One node and its control plane, torn down by [`RealNode::stop`] or when dropped.
pub struct RealNode {
    pub dir: PathBuf,
    pub cluster: Cluster,
    guard: Guard,
}

/// The namespaces and the node's cgroups, torn down when dropped (a start that fails too).
struct Guard {
    ns: Namespaces,
    dir: PathBuf,
    /// The kubelet's `cgroupRoot`, made in every hierarchy before it starts.
    cgroup_root: String,
    stopped: bool,
}

impl RealNode {
    /// Brings the namespaces, the control plane, containerd and the kubelet up, and waits
    /// until the apiserver says the node is Ready.
    pub fn start() -> RealNode {
        let started = Instant::now();
        let kube = super::cluster::kube_bin();
        let root = std::env::temp_dir();
        sweep(&root);
        // One directory and cgroup per node: a test binary may start several.
        static NODES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "datastore-node-{}-{}",
            std::process::id(),
            NODES.fetch_add(1, Ordering::SeqCst)
        );
        let dir = root.join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();

        let images = dir.join("images");
        let out = Command::new("bash")
            .arg(scripts().join("images.sh"))
            .arg(&images)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "images.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );

        // The cgroups first: a teardown after a failed start removes them too.
        let cgroup_root = name.clone();
        for h in hierarchies() {
            let path = h.join(&cgroup_root);
            std::fs::create_dir_all(&path).unwrap();
            // A new cpuset has no CPUs or memory nodes until given its parent's.
            for file in ["cpuset.cpus", "cpuset.mems"] {
                if let Ok(value) = std::fs::read_to_string(h.join(file)) {
                    std::fs::write(path.join(file), value.trim()).unwrap();
                }
            }
        }

        let guard = Guard {
            ns: Namespaces::start(&dir, &dir.join("namespaces.log")),
            dir: dir.clone(),
            cgroup_root,
            stopped: false,
        };
        let node = RealNode {
            cluster: cluster::start(&guard.ns, &dir.join("plane")),
            dir,
            guard,
        };
        let plane_up = started.elapsed();
        node.start_containerd();
        node.start_kubelet(&kube);
        node.start_kube_proxy(&kube);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // The client's worker runs on the runtime it is made in.
        let nodes: Api<Node> = Api::all(runtime.block_on(async { node.cluster.admin() }));
        wait_until(
            "the node (Ready through the apiserver)",
            Duration::from_secs(120),
            &node.dir.join("kubelet.log"),
            || {
                runtime
                    .block_on(nodes.get_opt(NODE))
                    .ok()
                    .flatten()
                    .is_some_and(|n| ready(&n))
            },
        );
        eprintln!(
            "real node {NODE} Ready in {:.1}s (control plane {:.1}s; files in {})",
            started.elapsed().as_secs_f64(),
            plane_up.as_secs_f64(),
            node.dir.display()
        );
        node
    }

    /// A command that runs `program` inside the node's namespaces (`ip`, `iptables`, `ctr`).
    pub fn inside(&self, program: &str) -> Command {
        self.guard.ns.command(program.as_ref())
    }

    fn containerd_socket(&self) -> PathBuf {
        self.dir.join("containerd/containerd.sock")
    }

    /// `ctr` against the node's containerd, inside the namespaces.
    fn ctr(&self, args: &[&str]) -> String {
        let out = self
            .guard
            .ns
            .command("ctr".as_ref())
            .arg("--address")
            .arg(self.containerd_socket())
            .args(["--namespace", "k8s.io"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ctr {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    fn start_containerd(&self) {
        let dir = &self.dir;
        let d = |p: &str| dir.join(p).display().to_string();
        let net_d = dir.join("cni/net.d");
        std::fs::create_dir_all(&net_d).unwrap();
        std::fs::write(
            net_d.join("10-e2e.conflist"),
            serde_json::json!({
                "cniVersion": "1.0.0",
                "name": "e2e",
                "plugins": [{
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": true,
                    "ipMasq": false,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_SUBNET}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": d("cni/ipam"),
                    },
                }],
            })
            .to_string(),
        )
        .unwrap();
        let config = dir.join("containerd/config.toml");
        std::fs::create_dir_all(config.parent().unwrap()).unwrap();
        std::fs::write(
            &config,
            format!(
                r#"version = 2
root = "{root}"
state = "{state}"

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  disable_apparmor = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_hugetlb_controller = true
  # This machine's root lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj.
  restrict_oom_score_adj = true

[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
  SystemdCgroup = false

[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "{net_d}"
  max_conf_num = 1
"#,
                root = d("containerd/root"),
                state = d("containerd/state"),
                socket = self.containerd_socket().display(),
                opt = d("containerd/opt"),
                net_d = net_d.display(),
            ),
        )
        .unwrap();
        let mut cmd = self.guard.ns.command("containerd".as_ref());
        cmd.arg("--config").arg(&config);
        let log = dir.join("containerd.log");
        cluster::spawn_logged(cmd, &log);
        wait_until("containerd", Duration::from_secs(30), &log, || {
            self.containerd_socket().exists()
                && self
                    .guard
                    .ns
                    .command("ctr".as_ref())
                    .arg("--address")
                    .arg(self.containerd_socket())
                    .arg("version")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
        });
        for image in ["pause.tar", "standin.tar"] {
            let tar = dir.join("images").join(image);
            self.ctr(&["images", "import", tar.to_str().unwrap()]);
        }
        let listed = self.ctr(&["images", "list", "--quiet"]);
        for image in [PAUSE_IMAGE, STANDIN_IMAGE] {
            assert!(
                listed.lines().any(|l| l == image),
                "{image} imported: {listed}"
            );
        }
    }

    fn start_kubelet(&self, kube: &Path) {
        let dir = &self.dir;
        let pki = self.cluster.dir.join("pki");
        let (key, crt) = client_certificate(
            &pki,
            "kubelet",
            &format!("/O=system:nodes/CN=system:node:{NODE}"),
        );
        let kubeconfig = dir.join("kubelet.kubeconfig");
        client_kubeconfig(&kubeconfig, &self.cluster, &crt, &key);
        std::fs::write(dir.join("resolv.conf"), format!("nameserver {NODE_IP}\n")).unwrap();
        let config = dir.join("kubelet.yaml");
        std::fs::write(
            &config,
            format!(
                r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
cgroupRoot: /{cgroup_root}
failSwapOn: false
# The apiserver dials the node's address; health on the loopback.
address: {NODE_IP}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {ca}}}
authorization: {{mode: Webhook}}
containerRuntimeEndpoint: unix://{socket}
resolvConf: {resolv}
# Otherwise it makes a directory under /usr/libexec.
volumePluginDir: {plugins}
# This machine's disk is shared and fuller than a node's would be; the images are
# imported, never to be collected.
evictionHard: {{memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
"#,
                cgroup_root = self.guard.cgroup_root,
                ca = self.cluster.ca.display(),
                socket = self.containerd_socket().display(),
                resolv = dir.join("resolv.conf").display(),
                plugins = dir.join("volume-plugins").display(),
            ),
        )
        .unwrap();
        let mut cmd = self.guard.ns.command(kube.as_os_str());
        cmd.arg("kubelet")
            .arg(format!("--config={}", config.display()))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg(format!("--root-dir={}", dir.join("kubelet").display()))
            .arg(format!("--cert-dir={}", dir.join("kubelet/pki").display()))
            .arg(format!("--hostname-override={NODE}"))
            .arg(format!("--node-ip={NODE_IP}"))
            .arg("--v=2");
        cluster::spawn_logged(cmd, &dir.join("kubelet.log"));
    }

    /// kube-proxy in iptables mode, as `system:kube-proxy` (the bootstrap `system:node-proxier`
    /// role): Services' ClusterIPs work for pods, in the namespaces' own netfilter tables.
    fn start_kube_proxy(&self, kube: &Path) {
        let dir = &self.dir;
        let pki = self.cluster.dir.join("pki");
        let (key, crt) = client_certificate(&pki, "kube-proxy", "/CN=system:kube-proxy");
        let kubeconfig = dir.join("kube-proxy.kubeconfig");
        client_kubeconfig(&kubeconfig, &self.cluster, &crt, &key);
        let config = dir.join("kube-proxy.yaml");
        std::fs::write(
            &config,
            format!(
                r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {{kubeconfig: {kubeconfig}}}
mode: iptables
clusterCIDR: {POD_SUBNET}
hostnameOverride: {NODE}
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# Zero leaves the conntrack sysctls alone: some are this machine's, not the namespace's.
conntrack: {{maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}}
"#,
                kubeconfig = kubeconfig.display(),
            ),
        )
        .unwrap();
        let mut cmd = self.guard.ns.command(kube.as_os_str());
        cmd.arg("kube-proxy")
            .arg(format!("--config={}", config.display()))
            .arg("--v=2");
        cluster::spawn_logged(cmd, &dir.join("kube-proxy.log"));
    }

    /// Ends everything in the namespaces, removes the node's cgroups and says what is left;
    /// removes the node's directory too when nothing is (otherwise the next run does).
    pub fn stop(mut self) -> Leftovers {
        let left = self.guard.teardown();
        if left == Leftovers::default() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        left
    }
}

impl Guard {
    fn teardown(&mut self) -> Leftovers {
        self.stopped = true;
        for forward in self.ns.forwards.lock().unwrap().iter() {
            forward.stop();
        }
        // The namespaces' PID 1 ends: the kernel kills everything in them.
        unsafe { libc::kill(self.ns.init as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while (alive(self.ns.unshare) || !self.ns.processes().is_empty())
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        // A killed process leaves its cgroups a moment after it is gone.
        for _ in 0..50 {
            let failed: Vec<PathBuf> = hierarchies()
                .iter()
                .flat_map(|h| remove_cgroup(&h.join(&self.cgroup_root)))
                .collect();
            if failed.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Looked at afresh, not taken from the removal's word.
        let cgroups = hierarchies()
            .iter()
            .map(|h| h.join(&self.cgroup_root))
            .filter(|p| p.exists())
            .collect();
        let dir = self.dir.display().to_string();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(&dir))
            .map(String::from)
            .collect();
        Leftovers {
            processes: self.ns.processes(),
            mounts,
            cgroups,
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.stopped {
            let left = self.teardown();
            if left != Leftovers::default() {
                let _ = writeln!(std::io::stderr(), "the real node left {left:?}");
            }
        }
    }
}

/// Whether the node's Ready condition is True.
pub fn ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}
