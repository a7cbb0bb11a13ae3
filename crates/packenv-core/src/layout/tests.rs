use super::*;

#[test]
fn pack_refs_are_strict() {
    for ok in ["core", "my_pack", "pack-2", "a.b", "_x"] {
        validate_pack_ref(ok).unwrap();
    }
    for bad in [
        "",
        "..",
        "a/b",
        "../x",
        ".hidden",
        "a..b",
        "-x",
        "a b",
        "ü",
        &"x".repeat(129),
    ] {
        assert!(validate_pack_ref(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn env_path_is_derived_or_checked_against_the_root() {
    let root = Path::new("/srv/envs");
    let loc = EnvLocation::new(root, "web", "Python", None).unwrap();
    assert_eq!(loc.env_path, Path::new("/srv/envs/web/python"));
    assert_eq!(loc.build_dir("t1"), Path::new("/srv/envs/web/.python-t1"));

    let given = EnvLocation::new(root, "web", "Python", Some("/srv/envs/web/py")).unwrap();
    assert_eq!(given.env_path, Path::new("/srv/envs/web/py"));

    for bad in [
        "/etc/passwd",
        "/srv/envs/../etc",
        "relative/path",
        "/srv/envs/other/python",
        "/srv/envs/web/.hidden",
    ] {
        assert!(
            EnvLocation::new(root, "web", "Python", Some(bad)).is_err(),
            "{bad} accepted"
        );
    }
}

/// An envs root packenvd owns, inside a scratch directory.
fn root() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("envs");
    EnvsRoot::open(&root, true).unwrap();
    (tmp, root)
}

#[test]
fn switching_is_a_rename_over_the_old_link() {
    let (_tmp, root) = root();
    let loc = EnvLocation::new(&root, "p", "python", None).unwrap();
    let a = loc.create_build_dir("a").unwrap();
    std::fs::write(a.join("f"), "a").unwrap();
    loc.switch_to(&a).unwrap();
    assert_eq!(
        std::fs::read_to_string(loc.env_path.join("f")).unwrap(),
        "a"
    );
    let b = loc.create_build_dir("b").unwrap();
    std::fs::write(b.join("f"), "b").unwrap();
    loc.switch_to(&b).unwrap();
    assert_eq!(
        std::fs::read_to_string(loc.env_path.join("f")).unwrap(),
        "b"
    );
    assert_eq!(loc.current_build().unwrap(), b);
    assert!(a.exists(), "the old build stays for running processes");
    let pack = loc.open(false).unwrap().unwrap();
    assert_eq!(
        pack.recorded().unwrap(),
        ["python"],
        "the environment is recorded"
    );
}

#[test]
fn a_legacy_directory_at_env_path_is_moved_aside() {
    let (_tmp, root) = root();
    let loc = EnvLocation::new(&root, "p", "python", None).unwrap();
    std::fs::create_dir_all(loc.env_path.join("bin")).unwrap();
    let b = loc.create_build_dir("b").unwrap();
    let aside = loc.switch_to(&b).unwrap().unwrap();
    assert!(aside.join("bin").is_dir());
    assert_eq!(loc.current_build().unwrap(), b);
}

#[test]
fn a_pack_dir_that_is_a_symlink_out_of_the_root_is_refused() {
    let (_tmp, root) = root();
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), root.join("p")).unwrap();
    let loc = EnvLocation::new(&root, "p", "python", None).unwrap();
    assert!(matches!(
        loc.create_build_dir("a"),
        Err(LayoutError::OutsideRoot { .. })
    ));
    assert!(matches!(
        loc.switch_to(&loc.build_dir("a")),
        Err(LayoutError::OutsideRoot { .. })
    ));
    assert_eq!(loc.current_build(), None);
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
}

#[test]
fn a_link_to_something_that_is_not_its_own_build_is_not_a_current_build() {
    let (_tmp, root) = root();
    let loc = EnvLocation::new(&root, "p", "python", None).unwrap();
    loc.create_build_dir("a").unwrap();
    let other = EnvLocation::new(&root, "p", "node", None).unwrap();
    let node_build = other.create_build_dir("n").unwrap();
    std::os::unix::fs::symlink(".node-n", &loc.env_path).unwrap();
    assert_eq!(loc.current_build(), None, "another environment's build");
    assert!(loc.remove_build(&node_build).is_err(), "not ours to remove");
    std::fs::remove_file(&loc.env_path).unwrap();
    std::os::unix::fs::symlink("/etc", &loc.env_path).unwrap();
    assert_eq!(
        loc.current_build(),
        None,
        "a link out of the pack directory"
    );
}

#[test]
fn an_envs_root_must_be_a_directory_of_ours_that_is_marked_or_empty() {
    let tmp = tempfile::tempdir().unwrap();
    let used = tmp.path().join("used");
    std::fs::create_dir_all(used.join("data")).unwrap();
    let err = EnvsRoot::open(&used, true).unwrap_err().to_string();
    assert!(err.contains("has no .packenvd-root marker"), "{err}");

    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(tmp.path(), &link).unwrap();
    let err = EnvsRoot::open(&link, true).unwrap_err().to_string();
    assert!(err.contains("is a symlink"), "{err}");

    assert!(EnvsRoot::open(Path::new("/"), false).is_err());
    assert!(EnvsRoot::open(&tmp.path().join("absent"), false)
        .unwrap()
        .is_none());

    let fresh = tmp.path().join("fresh");
    EnvsRoot::open(&fresh, true).unwrap();
    assert!(fresh.join(ROOT_MARKER).is_file(), "marked at creation");
    std::fs::create_dir(fresh.join("p")).unwrap();
    EnvsRoot::open(&fresh, false).unwrap().unwrap();

    if rustix::process::geteuid().is_root() {
        let theirs = tmp.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        let err = EnvsRoot::open(&theirs, true).unwrap_err().to_string();
        assert!(err.contains("is owned by uid 65534"), "{err}");
    }
}
