use super::*;

#[test]
fn options_round_trip_through_the_command_line() {
    let c = Confinement {
        landlock: LandlockMode::Required,
        writable: vec!["/envs/p/.python-1".into(), "/cache/python".into()],
        hidden: vec!["/etc/packenvd".into()],
        tcp_ports: Some(vec![80, 443]),
        memory: Some(1 << 30),
        processes: None,
        file_size: Some(1 << 20),
        namespaces: false,
    };
    let mut args = c.to_args();
    args.extend(["--".into(), "pip".into(), "install".into()]);
    let (parsed, command) = Confinement::from_args(&args).unwrap();
    assert_eq!(parsed, c);
    assert_eq!(command, [OsString::from("pip"), OsString::from("install")]);
    assert!(Confinement::from_args(&["--bogus".into()]).is_err());
    assert!(Confinement::from_args(&["--port".into(), "70000".into(), "--".into()]).is_err());
}

#[test]
fn a_partial_landlock_warning_names_exactly_what_the_kernels_abi_lacks() {
    let at = |abi: u32| ProbeAnswer::parse(&format!("landlock partially enforced\nabi {abi}"));
    let v1 = at(1).shortfall(true);
    assert!(
        v1.starts_with("ABI 1: steps still write only to their build"),
        "{v1}"
    );
    for lacks in ["truncate", "TCP connects", "ioctls on devices"] {
        assert!(v1.contains(lacks), "{v1}");
    }
    let v3 = at(3).shortfall(true);
    assert!(
        !v3.contains("truncate") && v3.contains("TCP connects"),
        "{v3}"
    );
    assert!(v3.contains("ioctls on devices"), "{v3}");
    let v4 = at(4).shortfall(true);
    assert_eq!(
        v4,
        "ABI 4: steps still write only to their build, cache and tmp and cannot read the \
         hidden paths, and connect only to step_tcp_ports, but their ioctls on devices are \
         not restricted (ABI 5, Linux 6.10); they may signal processes of their user outside \
         their build and connect to abstract unix sockets (ABI 6, Linux 6.12)"
    );
    let v3_any_port = at(3).shortfall(false);
    assert!(
        !v3_any_port.contains("TCP"),
        "no ports are asked for: {v3_any_port}"
    );

    let full = ProbeAnswer::parse("landlock fully enforced\nabi 7\n");
    assert_eq!(
        (full.fully_enforced(), full.shortfall(true)),
        (true, String::new())
    );
    let none = ProbeAnswer::parse("landlock not enforced\nabi 0").shortfall(true);
    assert!(none.starts_with("steps are not confined at all"), "{none}");
    let unavailable = ProbeAnswer::parse("landlock unavailable: x\nabi 0");
    assert_eq!(unavailable.status, "landlock unavailable: x");
    assert!(unavailable.shortfall(true).contains("not confined at all"));
    let old_supervisor = ProbeAnswer::parse("landlock partially enforced");
    assert_eq!(old_supervisor.abi, None);
    assert!(old_supervisor.shortfall(true).contains("ABI 5"));
}

#[test]
fn descendants_are_found_through_the_process_tree() {
    let mut child = Command::new("sh")
        .args(["-c", "sleep 30 & wait"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let mine = descendants(std::process::id() as i32);
    assert!(mine.contains(&(child.id() as i32)), "{mine:?}");
    // Only the shell's own tree: other tests of this process have children too.
    let below = descendants(child.id() as i32);
    assert_eq!(below.len(), 1, "the sleep below the shell: {below:?}");
    for p in below {
        let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
    }
    let _ = child.kill();
    let _ = child.wait();
}
