//! An Azurite of its own that a test can stop and start again on the same port and disk, for
//! storage outages: what it held before the stop is there after it, as for a service that
//! failed over. Put a proxy in front (`proxy::start_to`) so that its clients meet a refused or
//! closed connection while it is down, as behind a load balancer.

use std::process::Child;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use datastore_operator::store::BlobClient;
use datastore_operator::store::azure::Tuning;
use datastore_operator::store::{AzureBlobConfig, AzureCredential, Secret};

pub struct Restartable {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Mutex<Option<Child>>,
}

impl Restartable {
    pub fn start() -> Restartable {
        let azurite = Restartable {
            port: super::free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: Mutex::new(None),
        };
        azurite.resume();
        azurite
    }

    /// Starts it again (after [`Self::stop`]) and waits until it listens.
    pub fn resume(&self) {
        let mut child = self.child.lock().unwrap();
        assert!(child.is_none(), "Azurite is running already");
        let mut cmd = super::azurite_command(self.port);
        cmd.arg("--location").arg(self.dir.path());
        *child = Some(cmd.spawn().expect("Azurite starts"));
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "Azurite did not listen within 60s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops it as a service goes down (SIGTERM: it closes its connections and saves its
    /// state), and waits until it is gone.
    pub fn stop(&self) {
        let mut child = self
            .child
            .lock()
            .unwrap()
            .take()
            .expect("Azurite is running");
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A client of `container` straight to it (not through a proxy), with the account key.
    pub fn client(&self, container: &str) -> BlobClient {
        let cfg = AzureBlobConfig {
            account: super::ACCOUNT.into(),
            container: container.into(),
            endpoint: format!("http://127.0.0.1:{}/{}", self.port, super::ACCOUNT)
                .parse()
                .unwrap(),
            credential: AzureCredential::AccountKey(Secret::new(super::KEY)),
            credential_source: "test".into(),
            read_only: false,
        };
        BlobClient::new(cfg, Tuning::default()).unwrap()
    }
}

impl Drop for Restartable {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
