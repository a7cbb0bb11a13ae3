use super::*;

fn layers(env: &[(&str, &str)], flags: &[(&'static str, &str)]) -> Layers {
    Layers {
        file: None,
        flags: flags.iter().map(|(k, v)| (*k, v.to_string())).collect(),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn load(env: &[(&str, &str)]) -> Result<Loaded, ConfigError> {
    Settings::load(layers(env, &[]), true)
}

#[test]
fn flags_beat_environment_beats_file_beats_default() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(
        &file,
        "concurrency = 3\npoll_interval = \"9s\"\nstep_timeout = \"1m\"\n",
    )
    .unwrap();
    let mut l = layers(
        &[
            ("DATABASE_URL", "postgres://x"),
            ("PACKENVD_POLL_INTERVAL", "2s"),
            ("PACKENVD_STEP_TIMEOUT", "2m"),
        ],
        &[("step_timeout", "3m")],
    );
    l.file = Some(file.clone());
    let Loaded {
        settings: s,
        sources: src,
        ..
    } = Settings::load(l, true).unwrap();
    assert_eq!(s.concurrency, 3);
    assert_eq!(s.poll_interval, Duration::from_secs(2));
    assert_eq!(s.step_timeout, Duration::from_secs(180));
    assert_eq!(s.lease, Duration::from_secs(60));
    assert_eq!(src["concurrency"], Source::File(file));
    assert_eq!(src["step_timeout"], Source::Flag("step-timeout".into()));
    assert_eq!(src["lease"], Source::Default);
}

#[test]
fn a_bad_value_names_the_key_and_its_source() {
    for (var, value, words) in [
        (
            "PACKENVD_CONCURRENCY",
            "many",
            &["concurrency", "PACKENVD_CONCURRENCY", "many"][..],
        ),
        ("PACKENVD_POLL_INTERVAL", "soon", &["poll_interval", "soon"]),
        ("PACKENVD_ENVS_ROOT", "rel", &["envs_root", "absolute"]),
    ] {
        let err = load(&[("DATABASE_URL", "x"), (var, value)])
            .unwrap_err()
            .to_string();
        for w in words {
            assert!(err.contains(w), "{w:?} not in {err}");
        }
    }
}

#[test]
fn impossible_values_are_refused_with_the_key_named() {
    for (var, value, key) in [
        (
            "PACKENVD_CONCURRENCY",
            "18446744073709551615",
            "concurrency",
        ),
        ("PACKENVD_CONCURRENCY", "0", "concurrency"),
        ("PACKENVD_POLL_INTERVAL", "1ns", "poll_interval"),
        ("PACKENVD_LEASE", "10000000years", "lease"),
        ("PACKENVD_LEASE", "1s", "lease"),
        ("PACKENVD_ENVS_ROOT", "/srv/en\0vs", "envs_root"),
        ("PACKENVD_ENVS_ROOT", "/", "envs_root"),
        ("PACKENVD_SHUTDOWN_GRACE", "2d", "shutdown_grace"),
        ("PACKENVD_LOG_MAX_BYTES", "100", "log_max_bytes"),
        (
            "PACKENVD_ENV_PASSTHROUGH",
            "PATH,DATABASE_URL",
            "env_passthrough",
        ),
        ("PACKENVD_VERIFY_SCHEDULE", "hourly", "verify_schedule"),
    ] {
        let err = load(&[("DATABASE_URL", "x"), (var, value)])
            .err()
            .unwrap_or_else(|| panic!("{var}={value:?} accepted"));
        assert!(
            matches!(&err, ConfigError::Invalid { key: k, .. } if *k == key),
            "{var}={value:?}: {err}"
        );
    }
}

#[test]
fn unknown_file_keys_and_missing_database_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(&file, "concurency = 3\n").unwrap();
    let mut l = layers(&[("DATABASE_URL", "x")], &[]);
    l.file = Some(file);
    let err = Settings::load(l, true).unwrap_err().to_string();
    assert!(
        err.contains("`concurency`") && err.contains("did you mean `concurrency`"),
        "{err}"
    );
    assert!(matches!(load(&[]), Err(ConfigError::NoDatabase { .. })));
}

#[test]
fn an_unknown_packenvd_variable_is_a_warning_naming_the_closest_key() {
    let loaded = load(&[("DATABASE_URL", "x"), ("PACKENVD_CONCURENCY", "3")]).unwrap();
    assert_eq!(loaded.settings.concurrency, cpus());
    assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
    assert!(
        loaded.warnings[0].contains("did you mean PACKENVD_CONCURRENCY"),
        "{:?}",
        loaded.warnings
    );
}

#[test]
fn packenvd_database_url_is_a_warning_that_names_what_to_use_instead() {
    let loaded = load(&[
        ("DATABASE_URL", "postgres://a"),
        ("PACKENVD_DATABASE_URL", "postgres://u:hunter2@b"),
    ])
    .unwrap();
    assert_eq!(loaded.settings.database_url.expose(), "postgres://a");
    assert_eq!(loaded.warnings.len(), 1, "{:?}", loaded.warnings);
    let w = &loaded.warnings[0];
    assert!(
        w.contains("PACKENVD_DATABASE_URL is ignored")
            && w.contains("DATABASE_URL,")
            && w.contains("database_url_file")
            && !w.contains("hunter2"),
        "{w}"
    );
    let alone = load(&[("PACKENVD_DATABASE_URL", "postgres://b")])
        .unwrap_err()
        .to_string();
    assert!(
        alone.contains("PACKENVD_DATABASE_URL is set but not read"),
        "{alone}"
    );
}

#[test]
fn secrets_never_print() {
    let Loaded {
        settings: s,
        sources: src,
        ..
    } = load(&[("DATABASE_URL", "postgres://u:hunter2@h/db?password=hunter3")]).unwrap();
    assert!(!format!("{s:?}").contains("hunter2"));
    let text = s.to_toml(&src);
    assert!(
        !text.contains("hunter2") && !text.contains("hunter3"),
        "{text}"
    );
    assert!(text.contains("postgres://u:***@h/db"), "{text}");
    let err = load(&[
        ("DATABASE_URL", "postgres://u:hunter2@h/db"),
        ("PACKENVD_CONCURRENCY", "x"),
    ])
    .unwrap_err();
    assert!(!err.to_string().contains("hunter2"));
}

#[test]
fn check_config_output_loads_back_to_the_same_settings() {
    let dir = tempfile::tempdir().unwrap();
    let Loaded {
        settings: s,
        sources: src,
        ..
    } = load(&[
        ("DATABASE_URL", "postgres://u@h/db"),
        ("PACKENVD_CONCURRENCY", "7"),
        ("PACKENVD_METRICS_LISTEN", "127.0.0.1:9187"),
        ("PACKENVD_GC_GRACE", "1h 30m"),
    ])
    .unwrap();
    let file = dir.path().join("out.toml");
    std::fs::write(&file, s.to_toml(&src)).unwrap();
    let mut l = layers(&[], &[]);
    l.file = Some(file.clone());
    let again = Settings::load(l, true)
        .unwrap_or_else(|e| panic!("{e}:\n{}", s.to_toml(&src)))
        .settings;
    assert_eq!(again.values(), s.values());
    assert_eq!(again.database_url.expose(), "postgres://u@h/db");
}

#[test]
fn a_reload_applies_live_keys_and_keeps_the_others() {
    let old = load(&[("DATABASE_URL", "postgres://a")]).unwrap().settings;
    let new = load(&[
        ("DATABASE_URL", "postgres://b"),
        ("PACKENVD_CONCURRENCY", "9"),
        ("PACKENVD_ENVS_ROOT", "/elsewhere"),
    ])
    .unwrap()
    .settings;
    let (merged, changes) = old.reloaded(&new);
    assert_eq!(merged.concurrency, 9);
    assert_eq!(merged.envs_root, old.envs_root);
    assert_eq!(merged.database_url.expose(), "postgres://a");
    let applied: Vec<_> = changes
        .iter()
        .filter(|c| c.applied)
        .map(|c| c.key)
        .collect();
    let ignored: Vec<_> = changes
        .iter()
        .filter(|c| !c.applied)
        .map(|c| c.key)
        .collect();
    assert_eq!(applied, ["concurrency"]);
    assert_eq!(ignored, ["database_url", "envs_root"]);
    assert!(changes.iter().all(|c| !c.old.contains("postgres")));
}

#[test]
fn every_setting_has_help_and_the_example_config_loads() {
    for k in KEYS {
        assert!(!k.help_text().is_empty(), "{} has no help", k.name);
    }
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/packenvd.toml");
    let mut l = layers(&[("DATABASE_URL", "postgres://x")], &[]);
    l.file = Some(example.clone());
    let Loaded {
        settings, sources, ..
    } = Settings::load(l, true).unwrap_or_else(|e| panic!("{}: {e}", example.display()));
    assert_eq!(sources["gc_grace"], Source::File(example));
    assert_eq!(settings.verify_max_age, Duration::from_secs(7 * 86400));
}

#[test]
fn every_setting_is_a_flag_of_run() {
    use clap::{Args, FromArgMatches};
    let cmd = SettingFlags::augment_args(clap::Command::new("run"));
    let m = cmd
        .try_get_matches_from(["run", "--concurrency", "5", "--gc-grace", "2h"])
        .unwrap();
    let flags = SettingFlags::from_arg_matches(&m).unwrap();
    assert_eq!(flags.0["concurrency"], "5");
    assert_eq!(flags.0["gc_grace"], "2h");
}

#[test]
fn the_readme_lists_exactly_the_keys_sighup_applies() {
    let readme = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"),
    )
    .unwrap();
    let start = readme.find("**SIGHUP** reloads the config").unwrap();
    let end = start + readme[start..].find("\n\n").unwrap();
    let (live, restart) = readme[start..end].split_once("take effect").unwrap();
    let named = |text: &str, key: &str| {
        text.contains(&format!("`{key}`"))
            || ["gc_", "verify_", "database_url"]
                .iter()
                .any(|p| key.starts_with(p) && text.contains(&format!("`{p}*`")))
    };
    for k in KEYS {
        match k.reload {
            Reload::Live => assert!(named(live, k.name), "{} is reloadable", k.name),
            Reload::Restart => assert!(
                !named(live, k.name) && named(restart, k.name),
                "{} needs a restart",
                k.name
            ),
        }
    }
}
