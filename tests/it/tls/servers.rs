//! Servers that speak TLS with certificates made in the test: a private CA,
//! a throwaway PostgreSQL cluster, a private RabbitMQ node and a
//! TLS-terminating proxy (in front of the simulator). Each one lives in its
//! own temporary directory, on free ports, and is stopped when dropped, even
//! when the test fails.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use tempfile::TempDir;
use tokio::task::JoinHandle;

/// The second loopback address: the servers listen on it too, but their
/// certificates do not name it (the "wrong host name" cases).
pub const UNNAMED_HOST: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// A CA of the test and one server certificate it signed, for `localhost`
/// and 127.0.0.1; and a second, unrelated CA (trusted by mistake).
pub struct Pki {
    /// Holds the files; removed when dropped.
    _dir: TempDir,
    /// The CA's certificate (PEM): what `HOLDCLEAR_*TLS_CA_FILE` points at.
    pub ca: PathBuf,
    /// Another CA's certificate, which signed nothing here.
    pub other_ca: PathBuf,
    /// The server's certificate (PEM).
    pub cert: PathBuf,
    /// The server's private key (PKCS#8 PEM).
    pub key: PathBuf,
}

impl Pki {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (ca_pem, issuer) = ca("holdclear test CA");
        let (other_pem, _) = ca("holdclear unrelated CA");

        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress(Ipv4Addr::LOCALHOST.into()));
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.use_authority_key_identifier_extension = true;
        params.key_usages.push(KeyUsagePurpose::DigitalSignature);
        params.key_usages.push(KeyUsagePurpose::KeyEncipherment);
        params
            .extended_key_usages
            .push(ExtendedKeyUsagePurpose::ServerAuth);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &issuer).unwrap();

        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        Self {
            ca: write("ca.pem", &ca_pem),
            other_ca: write("other-ca.pem", &other_pem),
            cert: write("server.pem", &cert.pem()),
            key: write("server.key", &key.serialize_pem()),
            _dir: dir,
        }
    }
}

/// A rustls server configuration with the certificate chain and key in
/// these PEM files.
pub fn server_config(cert: &Path, key: &Path) -> Arc<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    Arc::new(config)
}

fn ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages.push(KeyUsagePurpose::KeyCertSign);
    params.key_usages.push(KeyUsagePurpose::CrlSign);
    params.key_usages.push(KeyUsagePurpose::DigitalSignature);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), Issuer::new(params, key))
}

/// A port free on the loopback addresses now (the server binds it next).
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A name no other test (or run) uses for a server of this test.
fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The last lines of a server's log, for a failure message.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// A child process in a process group of its own: stopped with `signal`,
/// then killed (the whole group) if it is not gone within `grace`.
struct Group {
    child: Child,
    signal: Signal,
    grace: Duration,
}

impl Group {
    fn spawn(mut cmd: Command, log: &Path, signal: Signal, grace: Duration) -> Self {
        let out = std::fs::File::create(log).expect("a log file");
        let err = out.try_clone().unwrap();
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        Self {
            child,
            signal,
            grace,
        }
    }

    /// Panics with the log's tail if the process has exited.
    fn check_running(&mut self, what: &str, log: &Path) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{what} exited ({status}) while starting:\n{}", tail(log));
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        let pgid = Pid::from_raw(self.child.id() as i32);
        let _ = killpg(pgid, self.signal);
        let deadline = Instant::now() + self.grace;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                // Helpers it started (Erlang's port programs) go with it.
                let _ = killpg(pgid, Signal::SIGKILL);
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = killpg(pgid, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Waits until `ready` answers, checking at each attempt that the server is
/// still running; panics at the deadline with the server's log.
async fn wait_ready<F, Fut>(
    what: &str,
    group: &mut Group,
    log: &Path,
    deadline: Duration,
    mut ready: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < deadline {
        group.check_running(what, log);
        match ready().await {
            Ok(()) => return,
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{what} not ready after {deadline:?} (last: {last}):\n{}",
        tail(log)
    );
}

/// The uid and gid the database server runs as: the `postgres` account when
/// the tests run as root (PostgreSQL refuses to run as root), else ours.
fn postgres_account() -> Option<(u32, u32)> {
    let me = std::fs::metadata("/proc/self").expect("/proc/self").uid();
    if me != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").expect("/etc/passwd");
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .expect("tests run as root need a `postgres` account to run PostgreSQL as");
    let fields: Vec<&str> = line.split(':').collect();
    Some((fields[2].parse().unwrap(), fields[3].parse().unwrap()))
}

/// Debian's PostgreSQL binaries (the newest version installed), or
/// `HOLDCLEAR_TEST_PG_BIN`.
fn postgres_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("HOLDCLEAR_TEST_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL's binaries under /usr/lib/postgresql (or HOLDCLEAR_TEST_PG_BIN)")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .expect("a PostgreSQL under /usr/lib/postgresql/*/bin")
        .1
}

/// A throwaway PostgreSQL cluster with `ssl=on` and the server certificate
/// and key given, on 127.0.0.1 and [`UNNAMED_HOST`], a free port.
pub struct PrivatePostgres {
    pub port: u16,
    // Dropped in this order: the server, then its directory.
    _server: Group,
    _dir: TempDir,
}

impl PrivatePostgres {
    pub async fn start(server_cert: &Path, server_key: &Path) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let account = postgres_account();
        let bin = postgres_bin();
        let data = dir.path().join("data");
        let cert = dir.path().join("server.pem");
        let key = dir.path().join("server.key");
        std::fs::copy(server_cert, &cert).unwrap();
        std::fs::copy(server_key, &key).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        if let Some((uid, gid)) = account {
            for p in [dir.path(), &cert, &key] {
                std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
            }
        }
        let as_account = |program: &str| {
            let mut cmd = Command::new(bin.join(program));
            cmd.current_dir(dir.path()).env("LC_ALL", "C");
            if let Some((uid, gid)) = account {
                cmd.uid(uid).gid(gid);
            }
            cmd
        };

        let init = as_account("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"])
            .output()
            .expect("initdb runs");
        assert!(
            init.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&init.stdout),
            String::from_utf8_lossy(&init.stderr)
        );

        let port = free_port();
        let log = dir.path().join("postgres.log");
        let mut cmd = as_account("postgres");
        cmd.arg("-D").arg(&data).arg("-p").arg(port.to_string());
        for setting in [
            format!("listen_addresses=127.0.0.1,{UNNAMED_HOST}"),
            format!("unix_socket_directories={}", dir.path().display()),
            "ssl=on".to_owned(),
            format!("ssl_cert_file={}", cert.display()),
            format!("ssl_key_file={}", key.display()),
            "fsync=off".to_owned(),
            "max_connections=20".to_owned(),
            "shared_buffers=16MB".to_owned(),
        ] {
            cmd.arg("-c").arg(setting);
        }
        let mut server = Group::spawn(cmd, &log, Signal::SIGINT, Duration::from_secs(10));

        // Ready when it answers a query (TLS without verification: this
        // checks the server, not the client under test).
        let options = sqlx::postgres::PgConnectOptions::new()
            .host("127.0.0.1")
            .port(port)
            .username("postgres")
            .database("postgres")
            .ssl_mode(sqlx::postgres::PgSslMode::Require);
        wait_ready(
            "PostgreSQL",
            &mut server,
            &log,
            Duration::from_secs(30),
            || async {
                use sqlx::{ConnectOptions, Connection};
                let conn = options.connect().await.map_err(|e| e.to_string())?;
                conn.close().await.map_err(|e| e.to_string())
            },
        )
        .await;
        Self {
            port,
            _server: server,
            _dir: dir,
        }
    }

    /// `postgres://postgres@HOST:PORT/DATABASE?sslmode=verify-full`.
    pub fn url(&self, host: &str, database: &str) -> String {
        format!(
            "postgres://postgres@{host}:{}/{database}?sslmode=verify-full",
            self.port
        )
    }
}

/// The RabbitMQ server script (Debian's, the one that does not switch
/// users), or `HOLDCLEAR_TEST_RABBITMQ_SERVER`.
fn rabbitmq_server() -> PathBuf {
    std::env::var("HOLDCLEAR_TEST_RABBITMQ_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("/usr/lib/rabbitmq/bin/rabbitmq-server"))
}

/// A second RabbitMQ node of its own (`holdclear-tls-…@localhost`): TLS
/// listeners only, on 127.0.0.1 and [`UNNAMED_HOST`], with the test's
/// server certificate; no plugins; its own data, logs, config and Erlang
/// cookie in a temporary directory. The shared broker is not touched (the
/// node registers with the machine's epmd like any other node).
pub struct PrivateRabbit {
    pub port: u16,
    _server: Group,
    _dir: TempDir,
}

impl PrivateRabbit {
    /// Starts the node; `ready` is called until it connects (with the
    /// client under test and the right CA), at most `deadline`.
    pub async fn start<F, Fut>(pki: &Pki, deadline: Duration, mut ready: F) -> Self
    where
        F: FnMut(u16) -> Fut,
        Fut: std::future::Future<Output = Result<(), String>>,
    {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = |name: &str| dir.path().join(name);
        for d in ["home", "mnesia", "log"] {
            std::fs::create_dir(path(d)).unwrap();
        }
        let port = free_port();
        let config = format!(
            "listeners.tcp = none\n\
             listeners.ssl.1 = 127.0.0.1:{port}\n\
             listeners.ssl.2 = {UNNAMED_HOST}:{port}\n\
             ssl_options.cacertfile = {ca}\n\
             ssl_options.certfile = {cert}\n\
             ssl_options.keyfile = {key}\n\
             ssl_options.verify = verify_none\n\
             ssl_options.fail_if_no_peer_cert = false\n",
            ca = pki.ca.display(),
            cert = pki.cert.display(),
            key = pki.key.display(),
        );
        std::fs::write(path("rabbitmq.conf"), config).unwrap();
        std::fs::write(path("enabled_plugins"), "[].\n").unwrap();
        // An empty environment file instead of /etc/rabbitmq/rabbitmq-env.conf
        // (which names the shared node).
        std::fs::write(path("rabbitmq-env.conf"), "").unwrap();

        let log = path("server.log");
        let mut cmd = Command::new(rabbitmq_server());
        cmd.current_dir(dir.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("LANG", "C.UTF-8")
            .env("HOME", path("home"))
            .env("RABBITMQ_CONF_ENV_FILE", path("rabbitmq-env.conf"))
            .env(
                "RABBITMQ_NODENAME",
                format!("{}@localhost", unique("holdclear-tls")),
            )
            .env("RABBITMQ_NODE_PORT", free_port().to_string())
            .env("RABBITMQ_DIST_PORT", free_port().to_string())
            .env("RABBITMQ_MNESIA_BASE", path("mnesia"))
            .env("RABBITMQ_LOG_BASE", path("log"))
            .env("RABBITMQ_CONFIG_FILE", path("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", path("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", path("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", path("rabbitmq.pid"));
        let mut server = Group::spawn(cmd, &log, Signal::SIGTERM, Duration::from_secs(15));
        wait_ready("RabbitMQ", &mut server, &log, deadline, || ready(port)).await;
        Self {
            port,
            _server: server,
            _dir: dir,
        }
    }

    /// `amqps://guest:guest@HOST:PORT/%2f`.
    pub fn url(&self, host: &str) -> String {
        format!("amqps://guest:guest@{host}:{}/%2f", self.port)
    }
}

/// Terminates TLS with a server certificate on 127.0.0.1 and
/// [`UNNAMED_HOST`] and passes the bytes on to `backend` (the simulator).
pub struct TlsProxy {
    /// The address on 127.0.0.1.
    pub addr: SocketAddr,
    /// The address on [`UNNAMED_HOST`].
    pub unnamed: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl TlsProxy {
    pub async fn start(config: Arc<rustls::ServerConfig>, backend: SocketAddr) -> Self {
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let mut addrs = Vec::new();
        let mut tasks = Vec::new();
        for ip in [Ipv4Addr::LOCALHOST, UNNAMED_HOST] {
            let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
            addrs.push(listener.local_addr().unwrap());
            let acceptor = acceptor.clone();
            tasks.push(tokio::spawn(async move {
                // Dropped with the accept loop: every connection stops too.
                let mut connections = tokio::task::JoinSet::new();
                while let Ok((tcp, _)) = listener.accept().await {
                    let acceptor = acceptor.clone();
                    connections.spawn(async move {
                        // A client that refuses the certificate ends here.
                        let Ok(mut tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let Ok(mut plain) = tokio::net::TcpStream::connect(backend).await else {
                            return;
                        };
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                    });
                }
            }));
        }
        Self {
            addr: addrs[0],
            unnamed: addrs[1],
            tasks,
        }
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
