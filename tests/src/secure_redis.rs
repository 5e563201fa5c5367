//! Redis servers configured the way a production buffer is protected: an ACL user with a
//! password and the passwordless default user switched off, or a TLS port with a certificate
//! signed by a throwaway certificate authority, on a standalone server or a cluster.
//!
//! The servers are the ordinary [`RedisServer`] and [`RedisCluster`] of this crate, locked down
//! once they are up: ACL users are created and the default user is disabled with `ACL SETUSER`
//! at run time, which is what a `user` line in `redis.conf` does at start, and it lets the
//! readiness checks and the cluster wiring run unchanged before the doors close. A TLS server
//! gets its certificate files at start, because `redis-server` opens its TLS port then; its
//! plain port stays open on loopback for the readiness check.
//!
//! Certificates are generated at test time (a CA, a server certificate for `127.0.0.1` and
//! `localhost`, a client certificate for mutual TLS), so nothing secret is committed and
//! nothing expires in the repository.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tempfile::TempDir;

use crate::redis_server::{RedisCluster, RedisServer, RedisServerError};

/// The ACL user the pipeline connects as.
pub const USER: &str = "spans";

/// Why a secured test Redis could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecureRedisError {
    /// The server or cluster did not start.
    #[error(transparent)]
    Server(#[from] RedisServerError),
    /// A command that locks the server down failed.
    #[error("redis setup command failed")]
    Redis(#[from] redis::RedisError),
    /// A certificate could not be generated.
    #[error("certificate generation failed")]
    Certificate(#[from] rcgen::Error),
    /// A certificate file or a port could not be prepared.
    #[error("failed to prepare tls files")]
    Io(#[from] std::io::Error),
}

/// A standalone server or a 3-master cluster whose only user is [`USER`] with a password.
#[derive(Debug)]
pub struct AclRedis {
    nodes: AclNodes,
    password: String,
}

#[derive(Debug)]
enum AclNodes {
    Standalone(RedisServer),
    Cluster(RedisCluster),
}

impl AclRedis {
    /// A standalone server with the ACL user `USER`/`password` and no default user.
    ///
    /// # Errors
    ///
    /// The server did not start or refused the ACL commands.
    pub fn standalone(password: &str) -> Result<Self, SecureRedisError> {
        let server = RedisServer::try_start()?;
        lock_down(&mut server.connection(), password)?;
        Ok(Self {
            nodes: AclNodes::Standalone(server),
            password: password.to_owned(),
        })
    }

    /// A 3-master cluster (its own, not the shared one) whose every node has the ACL user
    /// `USER`/`password`, authenticates to its master with it (`masteruser`/`masterauth`, for
    /// replicas added later) and has no default user.
    ///
    /// # Errors
    ///
    /// The cluster did not form or a node refused the ACL commands.
    pub fn cluster(password: &str) -> Result<Self, SecureRedisError> {
        let cluster = RedisCluster::try_start()?;
        for node in cluster.nodes() {
            let mut conn = node.connection();
            for (name, value) in [("masteruser", USER), ("masterauth", password)] {
                let _: () = redis::cmd("CONFIG")
                    .arg("SET")
                    .arg(name)
                    .arg(value)
                    .query(&mut conn)?;
            }
            lock_down(&mut conn, password)?;
        }
        Ok(Self {
            nodes: AclNodes::Cluster(cluster),
            password: password.to_owned(),
        })
    }

    /// Whether this is a cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.nodes, AclNodes::Cluster(_))
    }

    /// The password of [`USER`].
    pub fn password(&self) -> &str {
        &self.password
    }

    fn ports(&self) -> Vec<u16> {
        match &self.nodes {
            AclNodes::Standalone(server) => vec![server.port()],
            AclNodes::Cluster(cluster) => cluster.nodes().iter().map(RedisServer::port).collect(),
        }
    }

    /// `redis://127.0.0.1:<port>/` of every node, without credentials.
    pub fn urls(&self) -> Vec<String> {
        self.ports()
            .into_iter()
            .map(|port| format!("redis://127.0.0.1:{port}/"))
            .collect()
    }

    /// The URLs with `user:password@` in them.
    pub fn urls_as(&self, user: &str, password: &str) -> Vec<String> {
        self.ports()
            .into_iter()
            .map(|port| format!("redis://{user}:{password}@127.0.0.1:{port}/"))
            .collect()
    }

    /// Every key on every node, read as [`USER`].
    ///
    /// # Panics
    ///
    /// Panics when a node does not answer.
    pub fn keys(&self) -> Vec<String> {
        self.urls_as(USER, &self.password)
            .iter()
            .flat_map(|url| {
                let mut conn = redis::Client::open(url.as_str())
                    .and_then(|client| client.get_connection())
                    .unwrap_or_else(|error| panic!("cannot connect as {USER}: {error}"));
                redis::cmd("KEYS")
                    .arg("*")
                    .query::<Vec<String>>(&mut conn)
                    .unwrap_or_else(|error| panic!("KEYS failed: {error}"))
            })
            .collect()
    }
}

/// Creates [`USER`] with every permission and `password`, then switches the default user off.
fn lock_down(conn: &mut redis::Connection, password: &str) -> Result<(), redis::RedisError> {
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg(USER)
        .arg("on")
        .arg(format!(">{password}"))
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .query::<()>(conn)?;
    redis::cmd("ACL")
        .arg("SETUSER")
        .arg("default")
        .arg("off")
        .query(conn)
}

/// A certificate authority with a server certificate for `127.0.0.1`/`localhost` and a client
/// certificate, all as PEM files in a temporary directory.
#[derive(Debug)]
pub struct TestCertificates {
    dir: TempDir,
}

impl TestCertificates {
    /// Generates a fresh CA and the two certificates it signs.
    ///
    /// # Errors
    ///
    /// Key generation, signing or writing a file failed.
    pub fn generate() -> Result<Self, SecureRedisError> {
        let dir = TempDir::new()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "spans-pipeline test ca");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
        std::fs::write(dir.path().join("ca.pem"), ca.pem())?;
        for (name, purpose, names) in [
            (
                "server",
                ExtendedKeyUsagePurpose::ServerAuth,
                vec!["127.0.0.1".to_owned(), "localhost".to_owned()],
            ),
            ("client", ExtendedKeyUsagePurpose::ClientAuth, Vec::new()),
        ] {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(names)?;
            params
                .distinguished_name
                .push(DnType::CommonName, format!("spans-pipeline test {name}"));
            params.extended_key_usages = vec![purpose];
            let certificate = params.signed_by(&key, &ca)?;
            std::fs::write(dir.path().join(format!("{name}.pem")), certificate.pem())?;
            std::fs::write(
                dir.path().join(format!("{name}-key.pem")),
                key.serialize_pem(),
            )?;
        }
        Ok(Self { dir })
    }

    /// The CA certificate (PEM file).
    pub fn ca_file(&self) -> PathBuf {
        self.path("ca.pem")
    }

    /// The server certificate and key (PEM files).
    pub fn server_files(&self) -> (PathBuf, PathBuf) {
        (self.path("server.pem"), self.path("server-key.pem"))
    }

    /// The client certificate and key (PEM files), for mutual TLS.
    pub fn client_files(&self) -> (PathBuf, PathBuf) {
        (self.path("client.pem"), self.path("client-key.pem"))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A standalone server or a 3-master cluster whose nodes also listen for TLS, each on a second
/// loopback port. Cluster nodes announce their TLS ports as their client ports, so a cluster
/// client is sent to TLS ports only; their bus stays plain, on loopback.
#[derive(Debug)]
pub struct TlsRedis {
    nodes: TlsNodes,
    tls_ports: Vec<u16>,
    certificates: TestCertificates,
}

#[derive(Debug)]
enum TlsNodes {
    Standalone(RedisServer),
    Cluster(RedisCluster),
}

impl TlsRedis {
    /// Starts a standalone server with a TLS port; with `require_client_certificate` a client
    /// must present a certificate signed by the CA (mutual TLS).
    ///
    /// # Errors
    ///
    /// Certificates or the server could not be set up.
    pub fn start(require_client_certificate: bool) -> Result<Self, SecureRedisError> {
        let certificates = TestCertificates::generate()?;
        let mut tls_ports = Vec::new();
        // The TLS port, too, may be taken by another test between choosing and binding it:
        // a server that does not come up is started again on a new TLS port.
        let mut attempt = 0;
        let server = loop {
            attempt += 1;
            tls_ports.clear();
            let args = tls_args(&certificates, require_client_certificate, &mut tls_ports)?;
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            match RedisServer::try_start_with_args(&args) {
                Err(RedisServerError::NotReady { .. }) if attempt < TLS_PORT_ATTEMPTS => {}
                other => break other?,
            }
        };
        Ok(Self {
            nodes: TlsNodes::Standalone(server),
            tls_ports,
            certificates,
        })
    }

    /// Starts a 3-master cluster whose nodes serve clients over TLS.
    ///
    /// # Errors
    ///
    /// Certificates or the cluster could not be set up.
    pub fn cluster() -> Result<Self, SecureRedisError> {
        let certificates = TestCertificates::generate()?;
        let mut tls_ports = Vec::new();
        let mut failure = None;
        let cluster = RedisCluster::try_start_with_node_args(|| {
            tls_args(&certificates, false, &mut tls_ports).unwrap_or_else(|error| {
                failure = Some(error);
                Vec::new()
            })
        })?;
        if let Some(error) = failure {
            return Err(error);
        }
        announce_tls_ports(&cluster, &tls_ports)?;
        Ok(Self {
            nodes: TlsNodes::Cluster(cluster),
            tls_ports,
            certificates,
        })
    }

    /// Whether this is a cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.nodes, TlsNodes::Cluster(_))
    }

    /// `rediss://127.0.0.1:<tls port>/` of every node.
    pub fn tls_urls(&self) -> Vec<String> {
        self.tls_ports
            .iter()
            .map(|port| format!("rediss://127.0.0.1:{port}/"))
            .collect()
    }

    /// The certificates the servers were started with.
    pub fn certificates(&self) -> &TestCertificates {
        &self.certificates
    }

    /// The servers, for inspection over their plain loopback ports.
    pub fn servers(&self) -> Vec<&RedisServer> {
        match &self.nodes {
            TlsNodes::Standalone(server) => vec![server],
            TlsNodes::Cluster(cluster) => cluster.nodes().iter().collect(),
        }
    }

    /// Every key on every node, read over the plain ports.
    pub fn keys(&self) -> Vec<String> {
        self.servers()
            .into_iter()
            .flat_map(RedisServer::keys_with_ttls)
            .map(|key| key.key_str())
            .collect()
    }
}

/// Makes every node announce its TLS port as its client port, so the slot map and redirects
/// send a TLS client to TLS ports; the bus keeps its port (plain port + 10000). Waits until
/// every node knows every other node's new port.
fn announce_tls_ports(cluster: &RedisCluster, tls_ports: &[u16]) -> Result<(), SecureRedisError> {
    for (node, tls_port) in cluster.nodes().iter().zip(tls_ports) {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("cluster-announce-bus-port")
            .arg(u32::from(node.port()) + 10_000)
            .arg("cluster-announce-port")
            .arg(tls_port)
            .query(&mut node.connection())?;
    }
    let deadline = Instant::now() + ANNOUNCE_TIMEOUT;
    for node in cluster.nodes() {
        loop {
            let nodes: String = redis::cmd("CLUSTER")
                .arg("NODES")
                .query(&mut node.connection())?;
            let announced = tls_ports
                .iter()
                .all(|port| nodes.contains(&format!("127.0.0.1:{port}@")));
            if announced {
                break;
            }
            if Instant::now() > deadline {
                return Err(SecureRedisError::Io(std::io::Error::other(format!(
                    "tls ports not announced in time: {nodes}"
                ))));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// How long the nodes may take to learn each other's announced TLS ports.
const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(20);

/// `redis-server` arguments that open a TLS port (recorded in `tls_ports`) with the test
/// certificates.
/// How many TLS ports a standalone TLS server is tried on before its start fails.
const TLS_PORT_ATTEMPTS: u32 = 5;

fn tls_args(
    certificates: &TestCertificates,
    require_client_certificate: bool,
    tls_ports: &mut Vec<u16>,
) -> Result<Vec<String>, SecureRedisError> {
    let tls_port = free_loopback_port()?;
    tls_ports.push(tls_port);
    let (cert, key) = certificates.server_files();
    let client_auth = if require_client_certificate {
        "yes"
    } else {
        "no"
    };
    Ok([
        ("--tls-port", tls_port.to_string()),
        ("--tls-cert-file", path_arg(&cert)),
        ("--tls-key-file", path_arg(&key)),
        ("--tls-ca-cert-file", path_arg(&certificates.ca_file())),
        ("--tls-auth-clients", client_auth.to_owned()),
    ]
    .into_iter()
    .flat_map(|(name, value)| [name.to_owned(), value])
    .collect())
}

fn path_arg(path: &Path) -> String {
    path.display().to_string()
}

fn free_loopback_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ping(url: &str) -> redis::RedisResult<String> {
        redis::cmd("PING").query(&mut redis::Client::open(url)?.get_connection()?)
    }

    #[test]
    fn an_acl_server_lets_in_only_its_user() {
        let redis = AclRedis::standalone("s3cret").unwrap();

        assert_eq!(ping(&redis.urls_as(USER, "s3cret")[0]).unwrap(), "PONG");
        assert!(ping(&redis.urls_as(USER, "wrong")[0]).is_err());
        assert!(ping(&redis.urls()[0]).is_err());
        assert_eq!(redis.keys(), Vec::<String>::new());
    }

    #[test]
    fn certificates_are_written_as_pem() {
        let certificates = TestCertificates::generate().unwrap();

        for path in [
            certificates.ca_file(),
            certificates.server_files().0,
            certificates.client_files().1,
        ] {
            let text = std::fs::read_to_string(&path).unwrap();
            assert!(text.starts_with("-----BEGIN "), "{}", path.display());
        }
    }
}
