//! Release bundles as a site installs them: built by `quorum-aggregator release bundle`,
//! checked by `release verify`, extracted with `tar` into a fresh folder outside the build
//! tree and run with no `LD_LIBRARY_PATH`. The commands are those of `docs/DEPLOY.md`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::Duration,
};

use crate::support::{Federation, Spec, binary, heavy, must, release, run, s};

/// The client bundle, signed with the tests' release key, built once per test process.
fn client_bundle() -> &'static Path {
    static BUNDLE: OnceLock<PathBuf> = OnceLock::new();
    BUNDLE.get_or_init(|| {
        let release = release();
        let dir = release.client.parent().expect("release folder");
        let client = binary("quorum-client");
        let bundle = [
            "release",
            "bundle",
            "--binary",
            s(&client),
            "--version",
            &release.version,
            "--key",
            "release.key",
            "--out",
            "dist",
        ];
        let said = must(run(&binary("quorum-aggregator"), &bundle, dir));
        let archive = dir.join("dist").join(format!(
            "quorum-client-{}-{}-linux.tar.gz",
            release.version,
            std::env::consts::ARCH
        ));
        assert!(said.contains(" libraries -> "), "{said}");
        assert!(archive.exists(), "{said}");
        archive
    })
}

/// Extracts the bundle into `into` (as a site does) and returns its folder.
fn install(into: &Path) -> PathBuf {
    let archive = client_bundle();
    must(run(
        Path::new("tar"),
        &["-xzf", s(archive), "-C", s(into)],
        into,
    ));
    let name = archive
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_suffix(".tar.gz"))
        .expect("bundle archive name");
    into.join(name)
}

/// `release verify` on a bundle, with the federation's release key.
fn verify(bundle: &Path) -> std::process::Output {
    let release = release();
    let args = [
        "release",
        "verify",
        s(bundle),
        "--trusted-key",
        &release.public_key,
        "--allowed-version",
        &release.version,
    ];
    run(
        &binary("quorum-aggregator"),
        &args,
        bundle.parent().expect("parent"),
    )
}

/// A folder outside the build tree, so nothing there can borrow its LibTorch.
fn fresh_folder() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("quorum-install-")
        .tempdir()
        .expect("tempdir")
}

#[test]
fn bundle_extracted_into_a_fresh_folder_runs_and_completes_a_round() {
    let verified = must(verify(client_bundle()));
    assert!(
        verified.starts_with("ok: quorum-client version"),
        "{verified}"
    );
    let installed_in = fresh_folder();
    let installed = install(installed_in.path());
    must(verify(&installed));
    let client = installed.join("bin/quorum-client");
    // The build tree's LibTorch folder is gone from the RUNPATH: the bundle's lib/ or nothing.
    let bytes = fs::read(&client).expect("read the bundled client");
    assert!(!bytes.windows(15).any(|w| w == b"$ORIGIN/../lib:"));
    let version = Command::new(&client)
        .arg("--version")
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("run the bundled client");
    assert_eq!(
        must(version).trim(),
        format!("quorum-client {}", release().version)
    );

    let _heavy = heavy();
    let mut spec = Spec::new(&["alpha", "beta"]);
    spec.rounds = 1;
    let fed = Federation::new(spec);
    let mut aggregator = fed.start_aggregator("aggregator");
    let mut bundled = fed.client_command("alpha", &client, 5);
    bundled.env_remove("LD_LIBRARY_PATH");
    let mut alpha = fed.spawn("alpha", bundled);
    let mut beta = fed.start_client("beta");
    aggregator.wait_for_stderr("alpha joined: release", Duration::from_secs(120));
    // LibTorch is mapped from the bundle, not from the build tree.
    let maps = fs::read_to_string(format!("/proc/{}/maps", alpha.pid())).expect("alpha's maps");
    let torch: Vec<&str> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .filter(|p| p.ends_with("/libtorch_cpu.so"))
        .collect();
    assert!(!torch.is_empty(), "alpha has not loaded LibTorch:\n{maps}");
    assert!(
        torch.iter().all(|p| p.starts_with(s(&installed))),
        "alpha loaded LibTorch from outside its bundle: {torch:?}"
    );
    aggregator.wait_success(Duration::from_secs(300));
    alpha.wait_success(Duration::from_secs(30));
    beta.wait_success(Duration::from_secs(30));

    // The bundled site's libraries were checked at join; the plain release pins none.
    let log = aggregator.stderr_text();
    let joined = |site: &str| {
        log.lines()
            .find(|l| l.contains(&format!("{site} joined: release")))
            .unwrap_or_default()
            .to_owned()
    };
    assert!(
        !joined("alpha").ends_with(", 0 libraries"),
        "{}",
        joined("alpha")
    );
    assert!(
        joined("beta").ends_with(", 0 libraries"),
        "{}",
        joined("beta")
    );

    // The CPU bundle carries no CUDA backend: asking for a GPU says what to install.
    let cuda = [
        "run",
        "--bundle",
        "sites/alpha",
        "--config",
        "alpha.toml",
        "--server",
        &fed.address(),
        "--device",
        "cuda",
    ];
    let refused = run(&client, &cuda, fed.dir.path());
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("--device cuda needs LibTorch's CUDA backend")
            && said.contains("libtorch_cuda.so")
            && said.contains("CUDA bundle"),
        "{said}"
    );
}

#[test]
fn bundle_with_a_swapped_library_is_refused_by_verify_and_at_join() {
    let installed_in = fresh_folder();
    let installed = install(installed_in.path());
    let client = installed.join("bin/quorum-client");
    let fed = Federation::new(Spec::new(&["alpha", "beta"]));
    let mut aggregator = fed.start_aggregator("aggregator");

    // An intact bundle with a library put in from outside it (LD_PRELOAD): refused at join.
    let preload = installed_in.path().join("libpreload.so");
    fs::copy(installed.join("lib/libgomp.so.1"), &preload).expect("copy a library");
    let mut command = fed.client_command("alpha", &client, 5);
    command
        .env_remove("LD_LIBRARY_PATH")
        .env("LD_PRELOAD", &preload);
    let mut preloaded = fed.spawn("alpha-preloaded", command);
    let status = preloaded.wait(Duration::from_secs(120));
    assert!(
        !status.success(),
        "a client with a preloaded library joined"
    );
    let stderr = preloaded.stderr_text();
    assert!(
        stderr.contains("the aggregator refused this site")
            && stderr.contains(&format!("client loaded {}", s(&preload)))
            && stderr.contains("does not contain"),
        "expected a refusal naming the preloaded library:\n{stderr}"
    );

    // A rebuilt libgomp: still a loadable library, no longer the signed one.
    let library = installed.join("lib/libgomp.so.1");
    let mut bytes = fs::read(&library).expect("read libgomp");
    bytes.extend_from_slice(b"\0rebuilt");
    let swapped = installed.join("lib/.swap");
    fs::write(&swapped, &bytes).expect("write the swapped library");
    fs::rename(&swapped, &library).expect("swap the library");

    let refused = verify(&installed);
    assert!(!refused.status.success(), "a swapped library verified");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("lib/libgomp.so.1 has SHA-256"),
        "verify did not name the library: {stderr}"
    );

    let mut command = fed.client_command("alpha", &client, 5);
    command.env_remove("LD_LIBRARY_PATH");
    let mut alpha = fed.spawn("alpha", command);
    let status = alpha.wait(Duration::from_secs(120));
    assert!(!status.success(), "a client with a swapped library joined");
    let stderr = alpha.stderr_text();
    assert!(
        stderr.contains("the aggregator refused this site") && stderr.contains("libgomp.so.1"),
        "expected a refusal naming the library:\n{stderr}"
    );
    aggregator.kill();
    let reasons = fed.refusal_reasons();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("attestation failed") && r.contains("libgomp.so.1")),
        "no audited refusal naming the library in {reasons:?}"
    );
}
