use super::*;

fn step(pack: &Path, args: &[&str]) -> Vec<(String, PathBuf, Vec<String>)> {
    vec![(
        "install".into(),
        pack.to_owned(),
        args.iter()
            .map(|a| a.replace("{pack}", &pack.display().to_string()))
            .collect(),
    )]
}

/// A pack dir `pack` beside a file `secret` that holds `marker`.
fn setup() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let pack = dir.path().join("pack");
    std::fs::create_dir_all(pack.join("req")).unwrap();
    std::fs::create_dir_all(dir.path().join("outside")).unwrap();
    std::fs::write(dir.path().join("outside/secret"), "MARKER\n").unwrap();
    (dir, pack)
}

fn check(pack: &Path, requirements: &str) -> Result<(), IncludeError> {
    std::fs::write(pack.join("requirements.txt"), requirements).unwrap();
    check_steps(
        pack,
        &step(pack, &["install", "-r", "{pack}/requirements.txt"]),
    )
}

#[test]
fn lines_are_read_as_pip_reads_them() {
    let refs = requirement_refs(
        b"requests==2.31 ; python_version >= '3.8'\n-r base.txt\n--constraint=c.txt # pins\n\
          -e ./lib[extra]\n-e git+https://x/y.git#egg=y\n./pkg.whl\nfoo @ file:///abs/foo\n\
          bar @ https://example.org/bar.whl\n--find-links \\\n  ../wheels\n-rinline.txt\n\
          https://example.org/x.tar.gz\n# -r commented.txt\nfile://otherhost/share/x\n",
    );
    let got: Vec<(usize, &str, Target)> = refs
        .iter()
        .map(|r| (r.line, r.what, r.target.clone()))
        .collect();
    let p = |s: &str| Target::Path(s.into());
    assert_eq!(
        got,
        [
            (2, "-r", p("base.txt")),
            (3, "-c", p("c.txt")),
            (4, "-e", p("./lib")),
            (6, "a local path", p("./pkg.whl")),
            (7, "a direct reference", p("/abs/foo")),
            (11, "-r", p("inline.txt")),
            (14, "a local path", Target::RemoteFile),
        ]
    );
}

#[test]
fn includes_inside_the_pack_pass_and_any_way_out_fails_naming_the_include() {
    let (dir, pack) = setup();
    std::fs::write(pack.join("req/base.txt"), "-c pins.txt\nsix\n-e ./lib\n").unwrap();
    std::fs::write(pack.join("req/pins.txt"), "six==1.16.0\n").unwrap();
    std::fs::create_dir_all(pack.join("lib")).unwrap();
    std::os::unix::fs::symlink("req/base.txt", pack.join("relative-link.txt")).unwrap();
    std::os::unix::fs::symlink(pack.join("req"), pack.join("abs-link-in")).unwrap();
    check(
        &pack,
        "-r req/base.txt\n-r relative-link.txt\n-r abs-link-in/pins.txt\n-e ./lib\nrequests\n-r absent.txt\n",
    )
    .unwrap();

    let secret = dir.path().join("outside/secret");
    std::os::unix::fs::symlink(dir.path().join("outside"), pack.join("etc")).unwrap();
    for (line, include) in [
        ("-r /etc/shadow", "/etc/shadow"),
        ("-c ../outside/secret", "../outside/secret"),
        (
            &*format!("--requirement={}", secret.display()),
            &*secret.display().to_string(),
        ),
        ("-r etc/secret", "etc/secret"),
        ("-r etc/absent", "etc/absent"),
        ("-e ../outside", "../outside"),
        ("-e file:///etc", "file:///etc"),
        ("x @ file:///etc/passwd", "file:///etc/passwd"),
        ("../outside/x.whl", "../outside/x.whl"),
    ] {
        let err = check(&pack, &format!("six\n{line}\n")).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("requirements.txt, line 2: ")
                && text.contains(&format!("'{include}' resolves outside the pack directory")),
            "{line}: {text}"
        );
        assert!(!err.retryable());
    }
    // Nested: the including file and its line are named.
    std::fs::write(
        pack.join("req/base.txt"),
        "six\n\n-r ../../outside/secret\n",
    )
    .unwrap();
    let err = check(&pack, "-r req/base.txt\n").unwrap_err().to_string();
    assert!(
        err.starts_with("req/base.txt, line 3: -r '../../outside/secret'"),
        "{err}"
    );
    let err = check(&pack, "-r ${HOME}/x.txt\n").unwrap_err().to_string();
    assert!(err.contains("cannot be checked"), "{err}");
}

#[test]
fn a_manifest_that_is_a_symlink_out_of_the_pack_is_refused_unread() {
    let (dir, pack) = setup();
    // A FIFO outside: reading it would block, so passing shows it was never opened.
    let fifo = dir.path().join("outside/fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    std::os::unix::fs::symlink(&fifo, pack.join("requirements.txt")).unwrap();
    let err = check_steps(&pack, &step(&pack, &["-r", "{pack}/requirements.txt"])).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("requirements.txt (read by step 'install') resolves outside"),
        "{err}"
    );
    std::fs::remove_file(pack.join("requirements.txt")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", pack.join("package.json")).unwrap();
    let err = check_steps(&pack, &step(&pack, &["{pack}/package.json", "/x"])).unwrap_err();
    assert!(matches!(err, IncludeError::ManifestOutside { .. }), "{err}");
}

#[test]
fn npm_local_specs_and_lock_paths_stay_inside() {
    let (_dir, pack) = setup();
    std::fs::create_dir_all(pack.join("local")).unwrap();
    let run = |json: &str, name: &str| {
        std::fs::write(pack.join(name), json).unwrap();
        check_steps(&pack, &step(&pack, &[&format!("{{pack}}/{name}")]))
    };
    run(
        r#"{"dependencies": {"a": "^1.0.0", "b": "file:local", "c": "github:x/y"}}"#,
        "package.json",
    )
    .unwrap();
    let err = run(
        "{\n  \"dependencies\": {\n    \"evil\": \"file:../outside\"\n  }\n}",
        "package.json",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with(
            "package.json, line 3: dependencies.evil 'file:../outside' resolves outside"
        ),
        "{err}"
    );
    let err = run(r#"{"devDependencies": {"l": "link:/etc"}}"#, "package.json").unwrap_err();
    assert!(err.to_string().contains("'link:/etc'"), "{err}");
    let err = run(
        r#"{"lockfileVersion": 3, "packages": {"": {}, "node_modules/x": {"resolved": "../outside", "link": true}, "../outside": {}}}"#,
        "package-lock.json",
    )
    .unwrap_err();
    assert!(err.to_string().contains("'../outside'"), "{err}");
}

#[test]
fn past_the_include_limits_the_row_fails_instead_of_pip_following_unchecked() {
    let (_dir, pack) = setup();
    for i in 0..INCLUDE_DEPTH + 1 {
        std::fs::write(
            pack.join(format!("req/{i}.txt")),
            format!("-r {}.txt\n", i + 1),
        )
        .unwrap();
    }
    let err = check(&pack, "-r req/0.txt\n").unwrap_err();
    assert!(matches!(err, IncludeError::TooMany { .. }), "{err}");
    // A file including itself is read once.
    check(&pack, "-r requirements.txt\n").unwrap();
}

#[test]
fn a_pack_yaml_linked_out_of_the_pack_is_an_error_and_unread() {
    let (dir, pack) = setup();
    std::os::unix::fs::symlink(dir.path().join("outside/secret"), pack.join("pack.yaml")).unwrap();
    let err = read_pack_file(&pack, "pack.yaml", 1 << 16)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("pack.yaml resolves outside the pack directory"),
        "{err}"
    );
    assert!(!err.contains("MARKER"), "{err}");
    assert_eq!(read_pack_file(&pack, "absent.yaml", 10).unwrap(), None);
}
