use super::*;
use sha2::Digest as _;

fn check(build: &Path, budget: Budget) -> Result<(), RecordProblem> {
    check_python(build, budget, &AtomicBool::new(false))
}

/// A venv-shaped build with one distribution whose RECORD is `record`.
fn venv(record: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let build = dir.path().join("build");
    let site = build.join("lib/python3.11/site-packages");
    std::fs::create_dir_all(site.join("demo-0.1.dist-info")).unwrap();
    std::fs::create_dir_all(site.join("demo")).unwrap();
    std::fs::create_dir_all(build.join("bin")).unwrap();
    std::fs::write(site.join("demo/__init__.py"), "").unwrap();
    std::fs::write(build.join("bin/demo"), "").unwrap();
    std::fs::write(
        site.join("demo-0.1.dist-info/METADATA"),
        "Metadata-Version: 2.1\nName: Demo-Pkg\nVersion: 0.1\n\nName: not this\n",
    )
    .unwrap();
    std::fs::write(site.join("demo-0.1.dist-info/RECORD"), record).unwrap();
    std::os::unix::fs::symlink("lib", build.join("lib64")).unwrap();
    (dir, build)
}

#[test]
fn a_complete_distribution_passes_with_scripts_caches_and_outside_paths() {
    let (_dir, build) = venv(
        "demo/__init__.py,sha256=47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU,0\n\
         demo/__pycache__/__init__.cpython-311.pyc,,\n\
         demo/gone.pyc,,\n\
         ../../../bin/demo,sha256=47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU,0\n\
         demo/__init__.py,sha512=not-checked,1\n\
         ../../../../../../etc/passwd,,\n\
         /etc/shadow,,\n\
         \"demo/__init__.py\",,\n\
         demo-0.1.dist-info/RECORD,,\n\
         \n",
    );
    check(&build, Budget::default()).unwrap();
}

#[test]
fn a_missing_file_names_the_package_and_the_file() {
    let (_dir, build) =
        venv("demo/__init__.py,,\ndemo/a.py,,\n../../../bin/gone,,\ndemo/b.py,,\ndemo/c.py,,\n");
    let absolute = build.join("lib/python3.11/site-packages/demo/abs.py");
    let record = build.join("lib/python3.11/site-packages/demo-0.1.dist-info/RECORD");
    let mut text = std::fs::read_to_string(&record).unwrap();
    text.push_str(&format!("{},,\n", absolute.display()));
    std::fs::write(&record, text).unwrap();
    let err = check(&build, Budget::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "package Demo-Pkg 0.1 is missing demo/a.py, ../../../bin/gone, demo/b.py and 2 more file(s)"
    );
}

/// The RECORD hash of an empty file, which `venv` makes `demo/__init__.py`.
const EMPTY_SHA256: &str = "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU";

/// A venv whose RECORD lists `demo/__init__.py` (empty) with its sha256.
fn hashed_venv() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let (dir, build) = venv(&format!(
        "demo/__init__.py,sha256={EMPTY_SHA256},0\ndemo-0.1.dist-info/RECORD,,\n"
    ));
    let module = build.join("lib/python3.11/site-packages/demo/__init__.py");
    (dir, build, module)
}

#[test]
fn a_file_changed_after_install_names_the_package_the_file_and_both_hashes() {
    let (_dir, build, module) = hashed_venv();
    check(&build, Budget::default()).unwrap();
    std::fs::write(&module, "import os\n").unwrap();
    let err = check(&build, Budget::default()).unwrap_err();
    let now = hash::encode(&sha2::Sha256::digest(b"import os\n").into());
    assert_eq!(
        err.to_string(),
        format!("package Demo-Pkg 0.1: demo/__init__.py differs from what was installed (sha256 in RECORD {EMPTY_SHA256}, on disk {now})")
    );
}

#[test]
fn a_missing_file_is_named_before_a_changed_one() {
    let (_dir, build) = venv(&format!(
        "demo/__init__.py,sha256={EMPTY_SHA256},0\ndemo/gone.py,sha256={EMPTY_SHA256},0\n"
    ));
    std::fs::write(
        build.join("lib/python3.11/site-packages/demo/__init__.py"),
        "x",
    )
    .unwrap();
    let err = check(&build, Budget::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "package Demo-Pkg 0.1 is missing demo/gone.py"
    );
}

#[test]
fn a_link_or_a_fifo_in_place_of_a_hashed_file_differs_and_is_not_opened() {
    let (_dir, build, module) = hashed_venv();
    std::fs::remove_file(&module).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", &module).unwrap();
    let err = check(&build, Budget::default()).unwrap_err();
    assert!(
        err.to_string().ends_with(&format!(
            "(sha256 in RECORD {EMPTY_SHA256}, on disk a symbolic link)"
        )),
        "{err}"
    );
    std::fs::remove_file(&module).unwrap();
    nix::unistd::mkfifo(&module, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let err = check(&build, Budget::default()).unwrap_err();
    assert!(err.to_string().ends_with("on disk a FIFO)"), "{err}");
}

#[test]
fn a_malformed_hash_fails_the_check_naming_the_file_and_the_hash() {
    let (_dir, build) = venv("demo/__init__.py,sha256=not*base64,0\n");
    let err = check(&build, Budget::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "package Demo-Pkg 0.1: RECORD lists demo/__init__.py with the malformed hash \"sha256=not*base64\" (not sha256=<43 characters of URL-safe base64>): what was installed cannot be told"
    );
    let (_dir, build) = venv("\"demo/__init__.py\",\"sha256\",0\n");
    assert!(matches!(
        check(&build, Budget::default()),
        Err(RecordProblem::MalformedHash { .. })
    ));
}

#[test]
fn past_the_bytes_or_the_time_to_hash_files_are_only_looked_up() {
    let (_dir, build, module) = hashed_venv();
    std::fs::write(&module, "changed").unwrap();
    let no_bytes = Budget {
        hashed: 3,
        ..Budget::default()
    };
    check(&build, no_bytes).unwrap();
    let no_time = Budget {
        deadline: Some(Instant::now()),
        ..Budget::default()
    };
    check(&build, no_time).unwrap();
    std::fs::remove_file(&module).unwrap();
    assert!(matches!(
        check(&build, no_bytes),
        Err(RecordProblem::Missing { .. })
    ));
}

#[test]
fn a_cancelled_check_says_so_instead_of_passing() {
    let (_dir, build, _) = hashed_venv();
    let err = check_python(&build, Budget::default(), &AtomicBool::new(true)).unwrap_err();
    assert!(matches!(err, RecordProblem::Cancelled), "{err}");
}

#[test]
fn a_build_without_site_packages_has_nothing_to_check() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("node_modules")).unwrap();
    check(dir.path(), Budget::default()).unwrap();
}

#[test]
fn a_link_out_of_the_build_is_not_followed_and_not_called_missing() {
    let (_dir, build) = venv("demo/out/secret,,\n");
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        outside.path(),
        build.join("lib/python3.11/site-packages/demo/out"),
    )
    .unwrap();
    // Whether `secret` exists out there is never asked.
    check(&build, Budget::default()).unwrap();
}

#[test]
fn a_fifo_a_link_or_an_oversized_record_is_refused_at_once() {
    let (_dir, build) = venv("");
    let record = build.join("lib/python3.11/site-packages/demo-0.1.dist-info/RECORD");
    std::fs::remove_file(&record).unwrap();
    nix::unistd::mkfifo(&record, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let err = check(&build, Budget::default()).unwrap_err();
    assert!(err.to_string().contains("is a FIFO"), "{err}");

    std::fs::remove_file(&record).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", &record).unwrap();
    let err = check(&build, Budget::default()).unwrap_err();
    assert!(err.to_string().contains("a symbolic link"), "{err}");

    std::fs::remove_file(&record).unwrap();
    std::fs::File::create(&record)
        .unwrap()
        .set_len(RECORD_MAX_BYTES + 1)
        .unwrap();
    let err = check(&build, Budget::default()).unwrap_err();
    assert!(err.to_string().contains("is larger than"), "{err}");
}

#[test]
fn past_its_budget_a_check_stops_and_passes() {
    let (_dir, build) = venv("demo/__init__.py,,\ndemo/gone.py,,\n");
    let budget = Budget {
        entries: 1,
        ..Budget::default()
    };
    check(&build, budget).unwrap();
}

#[test]
fn without_openat2_links_are_not_followed_at_all() {
    let (_dir, build) = venv("");
    let root = open_dir(&build).unwrap();
    let site = Path::new("lib/python3.11/site-packages");
    let exists = |rel: &Path| match find_following_no_link(&root, rel, OFlags::PATH) {
        Lookup::Yes(_) => Some(true),
        Lookup::No => Some(false),
        Lookup::Unknown => None,
    };
    assert_eq!(exists(&site.join("demo/__init__.py")), Some(true));
    assert_eq!(exists(&site.join("demo/nope.py")), Some(false));
    assert_eq!(exists(&site.join("nodir/nope.py")), Some(false));
    assert_eq!(
        exists(Path::new("lib64/python3.11/site-packages/demo/__init__.py")),
        None
    );
}
