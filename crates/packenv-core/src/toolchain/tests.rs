use super::*;

fn v(s: &str) -> Version {
    Version::parse(s).unwrap()
}

fn ok(c: &str, version: &str) -> bool {
    Constraint::parse(c).unwrap().matches(&v(version))
}

#[test]
fn versions_are_read_from_what_interpreters_print() {
    assert_eq!(Version::find("Python 3.11.7"), Some(v("3.11.7")));
    assert_eq!(Version::find("v20.20.2"), Some(v("20.20.2")));
    assert_eq!(Version::find("Python 3.13.0rc1"), Some(v("3.13.0")));
    assert_eq!(Version::find("no version"), None);
    assert!(v("3.10") > v("3.9.18"));
    assert_eq!(v("3.11"), v("3.11.0"));
}

#[test]
fn python_and_npm_constraints_mean_what_their_users_expect() {
    for (c, yes, no) in [
        (">=3.8", "3.8.0", "3.7.17"),
        ("3.11.x", "3.11.7", "3.12.0"),
        ("3.11", "3.11.2", "3.1.0"),
        ("==3.11.*", "3.11.0", "3.10.9"),
        (">=3.8,<3.12", "3.11.9", "3.12.1"),
        (">= 3.8, < 3.12", "3.8.1", "3.12.0"),
        ("~=3.10", "3.13.1", "3.9.1"),
        ("~=3.10.2", "3.10.5", "3.11.0"),
        ("^18", "18.19.0", "19.0.0"),
        ("^18.2", "18.2.1", "18.1.9"),
        ("~18.2", "18.2.9", "18.3.0"),
        ("18.x", "18.0.1", "20.1.0"),
        (">=18 <21", "20.20.2", "22.0.0"),
        ("16 || 18", "18.1.0", "17.0.0"),
        ("!=3.9.*", "3.10.1", "3.9.2"),
        ("3", "3.13.1", "2.7.18"),
        (">3.9.*", "3.10.0", "3.9.9"),
    ] {
        assert!(ok(c, yes), "{c} should accept {yes}");
        assert!(!ok(c, no), "{c} should refuse {no}");
    }
    for bad in [
        "",
        "python",
        ">=",
        ">=3.x.1",
        "~=3",
        "3.8 ||",
        &"9".repeat(300),
    ] {
        assert!(
            Constraint::parse(bad).is_err(),
            "{bad:?} is not a constraint"
        );
    }
}

#[test]
fn pack_yaml_gives_the_constraints_of_the_interpreter_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("pack.yaml"),
        "ref: x\nversion: 1.0.0\nruntime_dependencies:\n  - python: \">=3.8\"\n  - nodejs: ^18\n  - python: 3.10\n",
    )
    .unwrap();
    let py = pack_yaml_requirements(dir.path(), Interpreter::Python).unwrap();
    let texts: Vec<String> = py.iter().map(|r| r.constraint.to_string()).collect();
    assert_eq!(texts, [">=3.8", "3.10"], "3.10 is not the float 3.1");
    let node = pack_yaml_requirements(dir.path(), Interpreter::Node).unwrap();
    assert_eq!(node[0].constraint.to_string(), "^18");

    std::fs::write(
        dir.path().join("pack.yaml"),
        "python_versions:\n  - \"3\"\n",
    )
    .unwrap();
    let py = pack_yaml_requirements(dir.path(), Interpreter::Python).unwrap();
    assert!(py[0].constraint.matches(&v("3.12.1")));
    assert!(!py[0].constraint.matches(&v("2.7.18")));

    std::fs::write(
        dir.path().join("pack.yaml"),
        "runtime_dependencies: {python: '>=3.9'}\n",
    )
    .unwrap();
    let py = pack_yaml_requirements(dir.path(), Interpreter::Python).unwrap();
    assert_eq!(py[0].constraint.to_string(), ">=3.9");
}

#[test]
fn a_hostile_pack_yaml_is_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let write = |s: &str| std::fs::write(dir.path().join("pack.yaml"), s).unwrap();
    let err = |s: &str| {
        write(s);
        pack_yaml_requirements(dir.path(), Interpreter::Python)
            .unwrap_err()
            .to_string()
    };
    // The billion laughs: refused at the first alias, before anything expands.
    let laughs = "a: &a [\"lol\",\"lol\"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n";
    assert!(err(laughs).contains("aliases"), "{}", err(laughs));
    assert!(err("runtime_dependencies: [\"python>=3\"]\n").contains("runtime_dependencies"));
    assert!(err("runtime_dependencies:\n  - python: \">=three\"\n").contains(">=three"));
    assert!(err("key: [unclosed\n").contains("pack.yaml"));
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    assert!(err(&deep).contains("deeper"), "{}", err(&deep));
    std::fs::remove_file(dir.path().join("pack.yaml")).unwrap();
    nix_mkfifo(&dir.path().join("pack.yaml"));
    assert!(err_no_write(dir.path()).contains("FIFO"));
}

fn nix_mkfifo(p: &Path) {
    rustix::fs::mknodat(
        rustix::fs::CWD,
        p,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
}

fn err_no_write(dir: &Path) -> String {
    pack_yaml_requirements(dir, Interpreter::Python)
        .unwrap_err()
        .to_string()
}

#[test]
fn the_newest_that_satisfies_every_constraint_is_chosen_or_the_error_says_what_exists() {
    let c = |p: &str, ver: &str| Candidate {
        path: PathBuf::from(p),
        version: v(ver),
    };
    let host = [
        c("/a/3.12", "3.12.1"),
        c("/a/3.9", "3.9.18"),
        c("/a/3.11", "3.11.7"),
    ];
    let req = |t: &str, s: &str| Requirement {
        constraint: Constraint::parse(t).unwrap(),
        source: s.into(),
    };
    assert_eq!(choose(Interpreter::Python, &[], &host).unwrap(), None);
    let chosen = choose(
        Interpreter::Python,
        &[req(">=3.8", "pack.yaml"), req("<3.12", "row")],
        &host,
    )
    .unwrap()
    .unwrap();
    assert_eq!(chosen.path, PathBuf::from("/a/3.11"));
    let err = choose(Interpreter::Python, &[req(">=3.14", "pack.yaml")], &host)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no Python on this host satisfies >=3.14 (from pack.yaml)")
            && err.contains("3.12.1 (/a/3.12)")
            && err.contains("3.9.18 (/a/3.9)"),
        "{err}"
    );
}

#[test]
fn the_host_version_is_asked_once_per_file() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("python3.99");
    let counter = dir.path().join("calls");
    std::fs::write(
        &exe,
        format!(
            "#!/bin/sh\necho x >> {}\necho 'Python 3.99.1'\n",
            counter.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let found = rt.block_on(pythons("", &[dir.path().to_path_buf()]));
    assert_eq!(
        found,
        [Candidate {
            path: exe.clone(),
            version: v("3.99.1")
        }]
    );
    rt.block_on(pythons("", &[dir.path().to_path_buf()]));
    let calls = std::fs::read_to_string(&counter).unwrap();
    assert_eq!(calls.lines().count(), 1, "asked once");
    // A changed file is asked again.
    std::fs::write(&exe, "#!/bin/sh\necho 'Python 3.99.2'\n").unwrap();
    let found = rt.block_on(pythons("", &[dir.path().to_path_buf()]));
    assert_eq!(found[0].version, v("3.99.2"));
}
