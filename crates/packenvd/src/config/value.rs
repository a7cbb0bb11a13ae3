//! How each kind of setting is read from text (environment, flags), read from TOML (the file),
//! and written back as TOML (`check-config`), so that what `check-config` prints loads back.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A setting's value type.
pub trait SettingValue: Sized + Clone + PartialEq + fmt::Debug {
    /// Parses a value given as text: an environment variable, a flag, or a TOML string.
    fn from_text(s: &str) -> Result<Self, String>;

    /// Reads a value of the config file.
    fn from_toml(v: &toml::Value) -> Result<Self, String> {
        match v {
            toml::Value::String(s) => Self::from_text(s),
            other => Self::from_text(&other.to_string()),
        }
    }

    /// The value as the config file would hold it.
    fn to_toml(&self) -> toml::Value;
}

/// A string that never prints: the database URL holds a password.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl SettingValue for Secret {
    fn from_text(s: &str) -> Result<Self, String> {
        no_nul(s)?;
        Ok(Secret(s.to_owned()))
    }

    /// Masked: a secret is never written out.
    fn to_toml(&self) -> toml::Value {
        toml::Value::String(mask_url(&self.0))
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`; a `password=` query
/// parameter is masked the same way.
pub fn mask_url(url: &str) -> String {
    let mut out = match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    };
    if let Some(q) = out.find('?') {
        let (base, query) = out.split_at(q + 1);
        let masked: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => kv.to_owned(),
            })
            .collect();
        out = format!("{base}{}", masked.join("&"));
    }
    out
}

/// Whether `url` carries a password that [`mask_url`] hides.
pub fn has_password(url: &str) -> bool {
    mask_url(url) != url
}

fn no_nul(s: &str) -> Result<(), String> {
    if s.contains('\0') {
        Err("contains a NUL byte".into())
    } else {
        Ok(())
    }
}

impl SettingValue for String {
    fn from_text(s: &str) -> Result<Self, String> {
        no_nul(s)?;
        Ok(s.to_owned())
    }
    fn to_toml(&self) -> toml::Value {
        toml::Value::String(self.clone())
    }
}

impl SettingValue for PathBuf {
    fn from_text(s: &str) -> Result<Self, String> {
        no_nul(s)?;
        let p = PathBuf::from(s);
        if !p.is_absolute() {
            return Err("must be an absolute path".into());
        }
        Ok(p)
    }
    fn to_toml(&self) -> toml::Value {
        toml::Value::String(self.display().to_string())
    }
}

impl SettingValue for Duration {
    fn from_text(s: &str) -> Result<Self, String> {
        humantime::parse_duration(s).map_err(|e| format!("{e} (use e.g. \"30s\", \"15m\", \"7d\")"))
    }
    fn to_toml(&self) -> toml::Value {
        toml::Value::String(humantime::format_duration(*self).to_string())
    }
}

impl SettingValue for bool {
    fn from_text(s: &str) -> Result<Self, String> {
        match s {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err("expected true or false".into()),
        }
    }
    fn to_toml(&self) -> toml::Value {
        toml::Value::Boolean(*self)
    }
}

macro_rules! integer_setting {
    ($($t:ty),*) => {$(
        impl SettingValue for $t {
            fn from_text(s: &str) -> Result<Self, String> {
                s.parse::<$t>().map_err(|_| "expected a whole number".to_string())
            }
            fn to_toml(&self) -> toml::Value {
                toml::Value::Integer(i64::try_from(*self).unwrap_or(i64::MAX))
            }
        }
    )*};
}
integer_setting!(usize, u32, i64);

impl SettingValue for Vec<String> {
    /// A comma-separated list.
    fn from_text(s: &str) -> Result<Self, String> {
        no_nul(s)?;
        Ok(s.split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(String::from)
            .collect())
    }
    fn from_toml(v: &toml::Value) -> Result<Self, String> {
        match v {
            toml::Value::Array(items) => items
                .iter()
                .map(|i| {
                    i.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| format!("expected strings, found {i}"))
                })
                .collect(),
            toml::Value::String(s) => Self::from_text(s),
            other => Err(format!("expected a list of strings, found {other}")),
        }
    }
    fn to_toml(&self) -> toml::Value {
        toml::Value::Array(self.iter().cloned().map(toml::Value::String).collect())
    }
}

/// An optional listen address: `""` (or `"off"`) is none.
impl SettingValue for Option<SocketAddr> {
    fn from_text(s: &str) -> Result<Self, String> {
        if s.is_empty() || s == "off" {
            return Ok(None);
        }
        s.parse()
            .map(Some)
            .map_err(|e| format!("{e} (use e.g. \"127.0.0.1:9187\", or \"\" for off)"))
    }
    fn to_toml(&self) -> toml::Value {
        toml::Value::String(self.map_or_else(String::new, |a| a.to_string()))
    }
}

/// An optional path: `""` is none.
impl SettingValue for Option<PathBuf> {
    fn from_text(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Ok(None);
        }
        PathBuf::from_text(s).map(Some)
    }
    fn to_toml(&self) -> toml::Value {
        toml::Value::String(
            self.as_ref()
                .map_or_else(String::new, |p| p.display().to_string()),
        )
    }
}

/// The user steps run as: a name or `uid:gid`, resolved when the setting is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildUser {
    /// As written in the configuration.
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// `""` is none: steps run as the daemon's user.
impl SettingValue for Option<BuildUser> {
    fn from_text(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Ok(None);
        }
        if let Some((u, g)) = s.split_once(':') {
            let (uid, gid) = u
                .parse()
                .ok()
                .zip(g.parse().ok())
                .ok_or_else(|| "expected a user name or uid:gid".to_string())?;
            return Ok(Some(BuildUser {
                name: s.to_owned(),
                uid,
                gid,
            }));
        }
        match nix::unistd::User::from_name(s) {
            Ok(Some(u)) => Ok(Some(BuildUser {
                name: s.to_owned(),
                uid: u.uid.as_raw(),
                gid: u.gid.as_raw(),
            })),
            Ok(None) => Err(format!("no user named {s:?} on this host (create it: useradd --system --no-create-home {s})")),
            Err(e) => Err(format!("cannot look up user {s:?}: {e}")),
        }
    }
    fn to_toml(&self) -> toml::Value {
        toml::Value::String(self.as_ref().map_or_else(String::new, |u| u.name.clone()))
    }
}

impl SettingValue for packenv_core::supervise::LandlockMode {
    fn from_text(s: &str) -> Result<Self, String> {
        Self::parse(s).ok_or_else(|| "expected best-effort, required or off".into())
    }
    fn to_toml(&self) -> toml::Value {
        toml::Value::String(self.as_str().into())
    }
}

/// A size limit in bytes (`"4GiB"`, `"512M"`, `"1048576"`), or a count; `"unlimited"` is none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit(pub Option<u64>);

impl SettingValue for Limit {
    fn from_text(s: &str) -> Result<Self, String> {
        if s == "unlimited" {
            return Ok(Limit(None));
        }
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let n: u64 = digits.parse().map_err(|_| {
            "expected a number with an optional unit (K, M, G, KiB, MiB, GiB), or unlimited"
                .to_string()
        })?;
        let factor: u64 = match unit.trim() {
            "" => 1,
            "K" | "KiB" | "k" => 1 << 10,
            "M" | "MiB" => 1 << 20,
            "G" | "GiB" => 1 << 30,
            other => return Err(format!("unknown unit {other:?} (K, M, G, KiB, MiB, GiB)")),
        };
        n.checked_mul(factor)
            .map(|v| Limit(Some(v)))
            .ok_or_else(|| "too large".into())
    }
    fn to_toml(&self) -> toml::Value {
        match self.0 {
            None => toml::Value::String("unlimited".into()),
            Some(v) if v % (1 << 30) == 0 => toml::Value::String(format!("{}GiB", v >> 30)),
            Some(v) if v % (1 << 20) == 0 => toml::Value::String(format!("{}MiB", v >> 20)),
            Some(v) => toml::Value::Integer(i64::try_from(v).unwrap_or(i64::MAX)),
        }
    }
}

/// TCP ports steps may connect to: a comma-separated list, or `"any"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ports(pub Option<Vec<u16>>);

impl SettingValue for Ports {
    fn from_text(s: &str) -> Result<Self, String> {
        if s == "any" {
            return Ok(Ports(None));
        }
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| p.parse::<u16>().map_err(|_| format!("{p:?} is not a port")))
            .collect::<Result<Vec<_>, _>>()
            .map(|v| Ports(Some(v)))
    }
    fn from_toml(v: &toml::Value) -> Result<Self, String> {
        match v {
            toml::Value::Array(items) => items
                .iter()
                .map(|i| {
                    i.as_integer()
                        .and_then(|n| u16::try_from(n).ok())
                        .ok_or_else(|| format!("{i} is not a port"))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(|v| Ports(Some(v))),
            toml::Value::String(s) => Self::from_text(s),
            other => Err(format!(
                "expected a list of ports or \"any\", found {other}"
            )),
        }
    }
    fn to_toml(&self) -> toml::Value {
        match &self.0 {
            None => toml::Value::String("any".into()),
            Some(v) => toml::Value::Array(
                v.iter()
                    .map(|p| toml::Value::Integer(i64::from(*p)))
                    .collect(),
            ),
        }
    }
}

/// Checks that `v` lies in `min..=max`, for the declarations' bounds.
pub fn within<T: PartialOrd + fmt::Debug>(v: T, min: T, max: T) -> Result<(), String> {
    if v < min || v > max {
        Err(format!("must be between {min:?} and {max:?}"))
    } else {
        Ok(())
    }
}

/// Checks that a duration lies in `min..=max`, and says so in humantime.
pub fn between(d: &Duration, min: Duration, max: Duration) -> Result<(), String> {
    if *d < min || *d > max {
        Err(format!(
            "must be between {} and {}",
            humantime::format_duration(min),
            humantime::format_duration(max)
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_loads_back_from_what_it_writes() {
        fn round<T: SettingValue>(v: T) {
            assert_eq!(T::from_toml(&v.to_toml()).unwrap(), v);
        }
        round(Duration::from_secs(5400));
        round(PathBuf::from("/var/lib/x"));
        round(vec!["A".to_string(), "B".to_string()]);
        round(Some("127.0.0.1:9187".parse::<SocketAddr>().unwrap()));
        round(None::<SocketAddr>);
        round(42usize);
        round(false);
        round("x".to_string());
        round(Limit(Some(4 << 30)));
        round(Limit(Some(1000)));
        round(Limit(None));
        round(Ports(Some(vec![80, 443])));
        round(Ports(None));
        round(Some(BuildUser {
            name: "0:0".into(),
            uid: 0,
            gid: 0,
        }));
        round(None::<PathBuf>);
        assert_eq!(Limit::from_text("512M").unwrap(), Limit(Some(512 << 20)));
    }

    #[test]
    fn passwords_are_masked_in_the_userinfo_and_the_query() {
        assert_eq!(
            mask_url("postgres://u:hunter2@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(
            mask_url("postgres://u@h/db?sslmode=require&password=hunter2"),
            "postgres://u@h/db?sslmode=require&password=***"
        );
        assert!(!has_password("postgres://u@h/db"));
        assert!(has_password("postgres://h/db?password=x"));
    }

    #[test]
    fn a_nul_byte_is_refused() {
        assert!(PathBuf::from_text("/a\0b").is_err());
        assert!(String::from_text("a\0").is_err());
    }
}
