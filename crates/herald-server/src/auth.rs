//! Who may do what: API keys with per-namespace capabilities, the generated admin key, and
//! `--dev` anonymous access.
//!
//! # Rules
//! - Deny by default. A request carries `Authorization: Bearer KEY`; a missing or unknown key
//!   is `401 unauthorized`, a known key without the capability is `403 forbidden`.
//! - A capability names namespaces (exact names or `"*"`) and operations; `admin` implies every
//!   operation. Bare channel names (no `:`) belong to the namespace `default`.
//! - Keys are compared by their BLAKE3 digests, whose equality is constant-time, and every
//!   configured key is compared on each request, so timing does not reveal a near match.
//! - In dev mode a request *without* a key is anonymous with every capability; a request with
//!   a wrong key is still refused, so a misconfigured client is noticed. Dev mode is only
//!   allowed on a loopback address ([`check_dev_bind`]).

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use herald_core::{ChannelName, ErrorCode};
use rand::Rng as _;
use serde::{Deserialize, Serialize};

use crate::config::{ApiKeyConfig, CapabilityConfig, DEFAULT_NAMESPACE};

/// What a request wants to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    Publish,
    /// Receive messages live (WebSocket and SSE subscriptions).
    Subscribe,
    History,
    /// Every operation.
    Admin,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Publish => "publish",
            Operation::Subscribe => "subscribe",
            Operation::History => "history",
            Operation::Admin => "admin",
        }
    }
}

/// Why a request was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denied {
    pub code: ErrorCode,
    pub message: String,
}

struct KeyEntry {
    name: String,
    digest: blake3::Hash,
    capabilities: Vec<CapabilityConfig>,
}

/// The request authenticator, built once at start.
pub struct Authenticator {
    keys: Vec<KeyEntry>,
    anonymous_allowed: bool,
}

impl Authenticator {
    /// A stable name for who a principal is (the key's configured name, or `anonymous`), for
    /// records that must stay with their creator (MQTT sessions).
    pub fn principal_name(&self, principal: Principal) -> String {
        match principal {
            Principal::Anonymous => "anonymous".to_owned(),
            Principal::Key(index) => self
                .keys
                .get(index)
                .map_or_else(|| format!("key-{index}"), |key| format!("key:{}", key.name)),
        }
    }

    pub fn new(keys: &[ApiKeyConfig], anonymous_allowed: bool) -> Self {
        Self {
            keys: keys
                .iter()
                .map(|key| KeyEntry {
                    name: key.name.clone(),
                    digest: blake3::hash(key.key.as_bytes()),
                    capabilities: key.capabilities.clone(),
                })
                .collect(),
            anonymous_allowed,
        }
    }

    /// Checks that the bearer of `authorization` (the raw header value) may do `operation` on
    /// `channel`.
    pub fn check(
        &self,
        authorization: Option<&[u8]>,
        channel: &ChannelName,
        operation: Operation,
    ) -> Result<(), Denied> {
        let principal = self.authenticate(authorization)?;
        self.authorize(principal, channel, operation)
    }

    /// Who sent the request: the API key it carries (`401` when missing or unknown, unless
    /// anonymous access is allowed and no key was sent).
    pub fn authenticate(&self, authorization: Option<&[u8]>) -> Result<Principal, Denied> {
        let Some(header) = authorization else {
            if self.anonymous_allowed {
                return Ok(Principal::Anonymous);
            }
            return Err(Denied {
                code: ErrorCode::Unauthorized,
                message: "missing API key: send \"Authorization: Bearer KEY\"".into(),
            });
        };
        let key = std::str::from_utf8(header)
            .ok()
            .and_then(|text| text.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| Denied {
                code: ErrorCode::Unauthorized,
                message: "the Authorization header must be \"Bearer KEY\"".into(),
            })?;
        self.authenticate_key(key)
    }

    /// The principal of a bare API key (a WebSocket `connect` frame, an SSE `key=` parameter).
    /// `None` means no key was given: anonymous in dev mode, `401` otherwise.
    pub fn authenticate_key_or_anonymous(&self, key: Option<&str>) -> Result<Principal, Denied> {
        match key {
            Some(key) => self.authenticate_key(key),
            None => self.authenticate(None),
        }
    }

    fn authenticate_key(&self, key: &str) -> Result<Principal, Denied> {
        let digest = blake3::hash(key.as_bytes());
        let mut found = None;
        for (index, entry) in self.keys.iter().enumerate() {
            // blake3::Hash equality is constant-time; no early exit either.
            if entry.digest == digest && found.is_none() {
                found = Some(index);
            }
        }
        found.map(Principal::Key).ok_or_else(|| Denied {
            code: ErrorCode::Unauthorized,
            message: "invalid API key".into(),
        })
    }

    /// Whether `principal` may do `operation` on `channel` (`403` when not).
    pub fn authorize(
        &self,
        principal: Principal,
        channel: &ChannelName,
        operation: Operation,
    ) -> Result<(), Denied> {
        let entry = match principal {
            Principal::Anonymous => return Ok(()),
            Principal::Key(index) => &self.keys[index],
        };
        let namespace = channel.namespace().unwrap_or(DEFAULT_NAMESPACE);
        let allowed = entry.capabilities.iter().any(|capability| {
            let operation_ok = capability
                .operations
                .iter()
                .any(|granted| *granted == Operation::Admin || *granted == operation);
            let namespace_ok = capability
                .namespaces
                .iter()
                .any(|pattern| pattern == "*" || pattern == namespace);
            operation_ok && namespace_ok
        });
        if allowed {
            Ok(())
        } else {
            Err(Denied {
                code: ErrorCode::Forbidden,
                message: format!(
                    "API key {:?} may not {} in namespace {namespace:?}",
                    entry.name,
                    operation.as_str(),
                ),
            })
        }
    }
}

/// An authenticated caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Principal {
    /// Dev mode, no key sent.
    Anonymous,
    /// The configured key at this index.
    Key(usize),
}

/// Refuses `--dev` (anonymous access) unless the server binds a loopback address only.
pub fn check_dev_bind(dev: bool, http_addr: SocketAddr) -> Result<(), String> {
    if dev && !http_addr.ip().is_loopback() {
        return Err(format!(
            "--dev allows anonymous access and is only allowed on a loopback address \
             (127.0.0.1 or ::1), but http_addr is {http_addr}; configure api_keys instead"
        ));
    }
    Ok(())
}

/// File name of the generated admin key inside the data dir.
pub const ADMIN_KEY_FILE: &str = "admin.key";

/// The admin key kept in the data dir, and whether this start created it.
#[derive(Clone, Debug)]
pub struct AdminKey {
    pub key: String,
    pub path: PathBuf,
    pub generated: bool,
}

/// Reads `<data_dir>/admin.key`, creating it (mode 0600) with a fresh random key if absent.
pub fn ensure_admin_key(data_dir: &Path) -> std::io::Result<AdminKey> {
    let path = data_dir.join(ADMIN_KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let key = text.trim().to_owned();
            if key.len() < crate::config::API_KEY_CHARS_MIN {
                return Err(std::io::Error::other(format!(
                    "{} does not hold a valid key; delete it to generate a new one",
                    path.display()
                )));
            }
            return Ok(AdminKey {
                key,
                path,
                generated: false,
            });
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    std::fs::create_dir_all(data_dir)?;
    let key = format!("hk_{}", random_base62(40));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&path)?;
    file.write_all(format!("{key}\n").as_bytes())?;
    file.sync_all()?;
    Ok(AdminKey {
        key,
        path,
        generated: true,
    })
}

/// The admin key as an API key with every capability.
pub fn admin_api_key(key: &str) -> ApiKeyConfig {
    ApiKeyConfig {
        name: "admin (generated)".into(),
        key: key.to_owned(),
        capabilities: vec![CapabilityConfig {
            namespaces: vec!["*".into()],
            operations: vec![Operation::Admin],
        }],
    }
}

/// `length` random characters of `[A-Za-z0-9]`.
pub fn random_base62(length: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..length)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(
        name: &str,
        secret: &str,
        namespaces: &[&str],
        operations: &[Operation],
    ) -> ApiKeyConfig {
        ApiKeyConfig {
            name: name.into(),
            key: secret.into(),
            capabilities: vec![CapabilityConfig {
                namespaces: namespaces.iter().map(|ns| ns.to_string()).collect(),
                operations: operations.to_vec(),
            }],
        }
    }

    #[test]
    fn capabilities_by_namespace_and_operation() {
        let auth = Authenticator::new(
            &[
                key(
                    "chat",
                    "chat-secret-0123456",
                    &["chat"],
                    &[Operation::Publish],
                ),
                key("root", "root-secret-0123456", &["*"], &[Operation::Admin]),
                key(
                    "plain",
                    "plain-secret-012345",
                    &["default"],
                    &[Operation::History],
                ),
            ],
            false,
        );
        let chat = ChannelName::parse("chat:room").unwrap();
        let bare = ChannelName::parse("room").unwrap();
        let check = |secret: Option<&str>, channel: &ChannelName, operation| {
            let header = secret.map(|secret| format!("Bearer {secret}"));
            auth.check(header.as_deref().map(str::as_bytes), channel, operation)
                .map_err(|denied| denied.code)
        };
        assert_eq!(
            check(Some("chat-secret-0123456"), &chat, Operation::Publish),
            Ok(())
        );
        assert_eq!(
            check(Some("chat-secret-0123456"), &chat, Operation::History),
            Err(ErrorCode::Forbidden)
        );
        assert_eq!(
            check(Some("chat-secret-0123456"), &bare, Operation::Publish),
            Err(ErrorCode::Forbidden)
        );
        assert_eq!(
            check(Some("root-secret-0123456"), &bare, Operation::History),
            Ok(())
        );
        assert_eq!(
            check(Some("plain-secret-012345"), &bare, Operation::History),
            Ok(())
        );
        assert_eq!(
            check(Some("plain-secret-012345"), &chat, Operation::History),
            Err(ErrorCode::Forbidden)
        );
        assert_eq!(
            check(None, &chat, Operation::Publish),
            Err(ErrorCode::Unauthorized)
        );
        assert_eq!(
            check(Some("chat-secret-012345X"), &chat, Operation::Publish),
            Err(ErrorCode::Unauthorized)
        );
    }

    #[test]
    fn dev_mode_is_anonymous_but_still_rejects_wrong_keys() {
        let auth = Authenticator::new(&[], true);
        let channel = ChannelName::parse("x").unwrap();
        assert!(auth.check(None, &channel, Operation::Admin).is_ok());
        assert_eq!(
            auth.check(
                Some(b"Bearer nope-nope-nope-nope"),
                &channel,
                Operation::Publish
            )
            .unwrap_err()
            .code,
            ErrorCode::Unauthorized
        );
    }

    #[test]
    fn dev_only_on_loopback() {
        assert!(check_dev_bind(true, "127.0.0.1:7600".parse().unwrap()).is_ok());
        assert!(check_dev_bind(true, "[::1]:7600".parse().unwrap()).is_ok());
        assert!(check_dev_bind(true, "0.0.0.0:7600".parse().unwrap()).is_err());
        assert!(check_dev_bind(true, "192.0.2.1:7600".parse().unwrap()).is_err());
        assert!(check_dev_bind(true, "[::]:7600".parse().unwrap()).is_err());
        assert!(check_dev_bind(false, "0.0.0.0:7600".parse().unwrap()).is_ok());
    }

    #[test]
    fn admin_key_is_created_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = ensure_admin_key(dir.path()).unwrap();
        assert!(first.generated);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&first.path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let second = ensure_admin_key(dir.path()).unwrap();
        assert!(!second.generated);
        assert_eq!(first.key, second.key);
    }
}
