//! `[redis]`: where the buffer lives, the credentials put into its URLs and the TLS files
//! read for `rediss://`; credentials never reach logs or errors.

use std::fmt;
use std::path::{Path, PathBuf};

use ::redis::{ClientTlsConfig, TlsCertificates};
use serde::{Deserialize, Serialize};

use super::ConfigError;

/// `[redis]`. Credentials may also be given in the URLs; they are never logged.
#[derive(Clone, Deserialize, PartialEq, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSection {
    /// `redis://host:port` (or `rediss://` for TLS) of the server, or of cluster nodes.
    pub urls: Vec<String>,
    /// Whether the URLs are nodes of a Redis Cluster.
    pub cluster: bool,
    /// ACL user name.
    pub username: Option<String>,
    /// Password.
    pub password: Option<String>,
    /// PEM file of the CA that signed the servers' certificates, for `rediss://` URLs; the
    /// system's trust store is used when absent.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with `client_key_file`).
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of `client_cert_file`.
    pub client_key_file: Option<PathBuf>,
}

impl Default for RedisSection {
    fn default() -> Self {
        Self {
            urls: vec!["redis://127.0.0.1:6379".to_owned()],
            cluster: false,
            username: None,
            password: None,
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
        }
    }
}

// Written by hand so credentials never reach logs or error messages.
impl fmt::Debug for RedisSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSection")
            .field(
                "urls",
                &self
                    .urls
                    .iter()
                    .map(|url| redact_url(url))
                    .collect::<Vec<_>>(),
            )
            .field("cluster", &self.cluster)
            .field("username", &self.username.as_ref().map(|_| "<set>"))
            .field("password", &self.password.as_ref().map(|_| "<set>"))
            .field("ca_file", &self.ca_file)
            .field("client_cert_file", &self.client_cert_file)
            .field("client_key_file", &self.client_key_file)
            .finish()
    }
}

impl RedisSection {
    /// The URLs with `username` and `password` put in (where the URL has none of its own).
    ///
    /// # Errors
    ///
    /// A URL that does not parse.
    pub fn connection_urls(&self) -> Result<Vec<String>, ConfigError> {
        self.urls
            .iter()
            .map(|url| with_credentials(url, self.username.as_deref(), self.password.as_deref()))
            .collect()
    }

    /// The TLS material of `ca_file`, `client_cert_file` and `client_key_file`, read from
    /// disk; `None` when none is set (plain `redis://`, or `rediss://` checked against the
    /// system's trust store).
    ///
    /// # Errors
    ///
    /// A file that cannot be read; a client certificate without its key or the reverse; TLS
    /// files without any `rediss://` URL (they would be silently ignored).
    pub fn tls_certificates(&self) -> Result<Option<TlsCertificates>, ConfigError> {
        let client = match (&self.client_cert_file, &self.client_key_file) {
            (Some(cert), Some(key)) => Some(ClientTlsConfig {
                client_cert: read_file(cert)?,
                client_key: read_file(key)?,
            }),
            (None, None) => None,
            (Some(_), None) | (None, Some(_)) => {
                return Err(ConfigError::Value {
                    key: "redis.client_cert_file",
                    reason: "client_cert_file and client_key_file go together".to_owned(),
                });
            }
        };
        let root_cert = self.ca_file.as_deref().map(read_file).transpose()?;
        if client.is_none() && root_cert.is_none() {
            return Ok(None);
        }
        if !self.urls.iter().any(|url| url.starts_with("rediss://")) {
            return Err(ConfigError::Value {
                key: "redis.ca_file",
                reason: "tls files are set but no url uses rediss://".to_owned(),
            });
        }
        Ok(Some(TlsCertificates {
            client_tls: client,
            root_cert,
        }))
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })
}

/// `url` with `username:password@` inserted, unless the URL carries credentials already.
fn with_credentials(
    url: &str,
    username: Option<&str>,
    password: Option<&str>,
) -> Result<String, ConfigError> {
    let (scheme, rest) = url.split_once("://").ok_or_else(|| ConfigError::Value {
        key: "redis.urls",
        reason: format!("{} is not a redis:// or rediss:// URL", redact_url(url)),
    })?;
    if !matches!(scheme, "redis" | "rediss") {
        return Err(ConfigError::Value {
            key: "redis.urls",
            reason: format!("unsupported scheme {scheme:?}"),
        });
    }
    if rest.contains('@') || (username.is_none() && password.is_none()) {
        return Ok(url.to_owned());
    }
    let credentials = match (username, password) {
        (Some(user), Some(password)) => format!("{user}:{password}@"),
        (Some(user), None) => format!("{user}@"),
        (None, Some(password)) => format!(":{password}@"),
        (None, None) => String::new(),
    };
    Ok(format!("{scheme}://{credentials}{rest}"))
}

/// `url` with any credentials replaced by `***`, for logs and errors; a string that is not
/// a URL but has an `@` in it loses everything before the `@`.
pub fn redact_url(url: &str) -> String {
    let Some(at) = url.rfind('@') else {
        return url.to_owned();
    };
    match url.split_once("://") {
        Some((scheme, _)) if scheme.len() < at => format!("{scheme}://***{}", &url[at..]),
        _ => format!("***{}", &url[at..]),
    }
}
