//! # The environment user code gets, built from scratch
//!
//! Scripts, health-check scripts and server-side steps never inherit the environment of the
//! program that starts them: that environment holds configuration (`GANTRY__*`, which may
//! carry the secrets key, the bootstrap API key or a broker password) and whatever else the
//! operator exported. They get the few variables below, taken from the agent's own environment
//! when set there, then what Gantry sets for them (the step's variables, `GANTRY_TASK_ID`, ...).
//!
//! Proxies (`http_proxy`, ...) are deliberately not passed on, since their URLs often carry a
//! password: a step that needs one gets it as a process variable.

use std::ffi::OsString;
use std::path::Path;

/// Inherited when set: none of them names a credential.
pub const INHERITED: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM",
];
/// Inherited by prefix (the locale categories).
pub const INHERITED_PREFIXES: &[&str] = &["LC_"];

/// `PATH` when the agent itself has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// An OS user code runs as: its name and home (the step's `HOME`, `USER` and `LOGNAME`).
pub struct User<'a> {
    pub name: &'a str,
    pub home: &'a Path,
}

/// The base environment for user code: the inherited variables from `from` (the caller's own
/// environment, normally `std::env::vars_os()`), with `HOME`, `USER` and `LOGNAME` of `user`
/// when it runs as another OS user.
pub fn base(
    from: impl IntoIterator<Item = (OsString, OsString)>,
    user: Option<User<'_>>,
) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = from
        .into_iter()
        .filter(|(k, _)| {
            k.to_str().is_some_and(|k| {
                INHERITED.contains(&k) || INHERITED_PREFIXES.iter().any(|p| k.starts_with(p))
            })
        })
        .collect();
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), DEFAULT_PATH.into()));
    }
    if let Some(u) = user {
        env.retain(|(k, _)| !matches!(k.to_str(), Some("HOME" | "USER" | "LOGNAME")));
        env.push(("HOME".into(), u.home.as_os_str().to_owned()));
        env.push(("USER".into(), u.name.into()));
        env.push(("LOGNAME".into(), u.name.into()));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    fn get<'a>(env: &'a [(OsString, OsString)], k: &str) -> Option<&'a str> {
        env.iter()
            .find(|(n, _)| n == k)
            .and_then(|(_, v)| v.to_str())
    }

    #[test]
    fn configuration_and_credentials_stay_behind() {
        let from = vars(&[
            ("PATH", "/opt/bin:/usr/bin"),
            ("HOME", "/root"),
            ("LC_ALL", "C.UTF-8"),
            ("GANTRY__SECRETS__KEY", "k"),
            ("GANTRY__API__BOOTSTRAP_KEY", "b"),
            ("GANTRY_SERVER", "http://x"),
            ("AWS_SECRET_ACCESS_KEY", "s"),
            ("https_proxy", "http://u:p@proxy"),
            ("BASH_ENV", "/tmp/evil"),
            ("LD_PRELOAD", "/tmp/evil.so"),
        ]);
        let env = base(from, None);
        assert_eq!(get(&env, "PATH"), Some("/opt/bin:/usr/bin"));
        assert_eq!(get(&env, "HOME"), Some("/root"));
        assert_eq!(get(&env, "LC_ALL"), Some("C.UTF-8"));
        for k in [
            "GANTRY__SECRETS__KEY",
            "GANTRY__API__BOOTSTRAP_KEY",
            "GANTRY_SERVER",
            "AWS_SECRET_ACCESS_KEY",
            "https_proxy",
            "BASH_ENV",
            "LD_PRELOAD",
        ] {
            assert_eq!(get(&env, k), None, "{k} leaked");
        }
    }

    #[test]
    fn another_user_gets_its_own_home_and_a_path_is_always_there() {
        let env = base(
            vars(&[("HOME", "/root"), ("USER", "root")]),
            Some(User {
                name: "nobody",
                home: Path::new("/nonexistent"),
            }),
        );
        assert_eq!(get(&env, "HOME"), Some("/nonexistent"));
        assert_eq!(get(&env, "USER"), Some("nobody"));
        assert_eq!(get(&env, "LOGNAME"), Some("nobody"));
        assert_eq!(get(&env, "PATH"), Some(DEFAULT_PATH));
        assert_eq!(env.iter().filter(|(k, _)| k == "HOME").count(), 1);
    }
}
