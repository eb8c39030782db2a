//! Minting service SAS tokens for one container with an account key:
//! <https://learn.microsoft.com/rest/api/storageservices/create-service-sas>

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use chrono::{DateTime, Utc};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::Access;
use super::azure::API_VERSION;

/// What a SAS allows, in the order the service requires (`racwdl`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Permissions {
    pub read: bool,
    pub add: bool,
    pub create: bool,
    pub write: bool,
    pub delete: bool,
    pub list: bool,
}

impl Permissions {
    pub fn as_str(&self) -> String {
        [
            (self.read, 'r'),
            (self.add, 'a'),
            (self.create, 'c'),
            (self.write, 'w'),
            (self.delete, 'd'),
            (self.list, 'l'),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, c)| c)
        .collect()
    }
}

/// The SAS permissions that grant `access`: creating a blob takes `c` and `w` (Put Block
/// writes), modifying one also `a` and `d`.
impl From<Access> for Permissions {
    fn from(access: Access) -> Self {
        let writes = access.create || access.modify;
        Permissions {
            read: access.read,
            add: access.modify,
            create: writes,
            write: writes,
            delete: access.modify,
            list: access.list,
        }
    }
}

/// A SAS token (without the leading `?`) for `container`, valid until `expiry`.
/// `account_key` is the base64 key; `None` when it is not valid base64.
pub fn container_sas(
    account: &str,
    account_key: &str,
    container: &str,
    permissions: Permissions,
    expiry: DateTime<Utc>,
) -> Option<String> {
    let key = B64.decode(account_key.trim()).ok()?;
    let sp = permissions.as_str();
    let se = expiry.format("%Y-%m-%dT%H:%M:%SZ").to_string();
    // Fields: sp, st, se, canonicalized resource, si, sip, spr, sv, sr, snapshot time,
    // encryption scope, rscc, rscd, rsce, rscl, rsct.
    let string_to_sign =
        format!("{sp}\n\n{se}\n/blob/{account}/{container}\n\n\n\n{API_VERSION}\nc\n\n\n\n\n\n\n");
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(&key).expect("HMAC accepts any key length");
    mac.update(string_to_sign.as_bytes());
    let sig = B64.encode(mac.finalize().into_bytes());
    let enc = |v: &str| url::form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>();
    Some(format!(
        "sv={API_VERSION}&sr=c&sp={sp}&se={}&sig={}",
        enc(&se),
        enc(&sig)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_keep_the_service_order() {
        let p = Permissions {
            list: true,
            read: true,
            write: true,
            create: true,
            ..Default::default()
        };
        assert_eq!(p.as_str(), "rcwl");
    }

    #[test]
    fn access_maps_to_the_least_permissions() {
        let sp = |access: Access| Permissions::from(access).as_str();
        assert_eq!(sp(Access::READ), "rl");
        assert_eq!(sp(Access::UPLOAD), "cwl");
        assert_eq!(sp(Access::READ.union(Access::UPLOAD)), "rcwl");
        assert_eq!(sp(Access::READ_WRITE), "racwdl");
    }

    #[test]
    fn token_carries_scope_and_expiry_and_no_key() {
        let expiry = DateTime::parse_from_rfc3339("2030-01-02T03:04:05Z")
            .unwrap()
            .with_timezone(&Utc);
        let key = B64.encode(b"secret-key-bytes");
        let t = container_sas(
            "acct",
            &key,
            "data",
            Permissions {
                read: true,
                list: true,
                ..Default::default()
            },
            expiry,
        )
        .unwrap();
        assert!(
            t.starts_with(&format!(
                "sv={API_VERSION}&sr=c&sp=rl&se=2030-01-02T03%3A04%3A05Z&sig="
            )),
            "{t}"
        );
        assert!(!t.contains(&key));
        assert!(
            container_sas(
                "acct",
                "not base64!",
                "data",
                Permissions::default(),
                expiry
            )
            .is_none()
        );
    }
}
