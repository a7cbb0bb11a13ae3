use super::*;
use crate::layout::EnvsRoot;

#[test]
fn discard_and_revert_never_follow_a_pack_directory_swapped_for_a_symlink() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("envs");
    EnvsRoot::open(&root, true).unwrap();
    let loc = EnvLocation::new(&root, "p", "python", None).unwrap();
    let build_dir = loc.build_dir("a");
    // What the pack directory's link leads to looks like a build and its env_path.
    let outside = tempfile::tempdir().unwrap();
    let lookalike = outside.path().join(build_dir.file_name().unwrap());
    std::fs::create_dir(&lookalike).unwrap();
    std::fs::write(lookalike.join("precious"), "keep me").unwrap();
    std::os::unix::fs::symlink(".python-a", outside.path().join("python")).unwrap();
    std::os::unix::fs::symlink(outside.path(), &loc.pack_dir).unwrap();

    let switch = Switch { loc, build_dir };
    switch.discard();
    assert!(
        lookalike.join("precious").exists(),
        "discard followed the link"
    );
    switch.revert(None);
    assert!(
        outside.path().join("python").symlink_metadata().is_ok(),
        "revert followed the link"
    );
}
