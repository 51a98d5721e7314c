//! Release bundles: a signed executable with the shared libraries it loads, so that a site
//! installs one folder anywhere and runs it without a LibTorch or a Python of its own.
//!
//! `quorum-client-<version>-<arch>-linux.tar.gz` (`…-linux-cuda` with the CUDA backend) holds
//! one folder of the same name:
//!
//! ```text
//! bin/quorum-client                 the executable; its RUNPATH is `$ORIGIN/../lib` alone
//! bin/quorum-client.release.json    the signed manifest: the SHA-256 of the executable and of
//!                                   every file in lib/
//! lib/libtorch_cpu.so, libc10.so …  every library it needs from outside the system's library
//!                                   folders (glibc, libstdc++ and their like stay the system's)
//! ```
//!
//! [`verify_bundle`] accepts an archive, or a folder it was extracted to, only if it holds
//! exactly the files its manifest lists, each with the listed digest, nothing that is not a
//! regular file, and a manifest signed by a trusted key. At join, a client whose release pins
//! libraries measures every non-system library in its own memory map
//! ([`measure_loaded_libraries`]), and the aggregator refuses a library the manifest does not
//! list or whose digest differs ([`crate::SelfMeasurementVerifier`]).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use flate2::{Compression, read::GzDecoder, write::GzEncoder};

use crate::error::{AttestError, Result};
use crate::release::{
    FileDigest, RELEASE_SUFFIX, ReleaseManifest, SignedRelease, sha256_file, sha256_reader,
    sign_manifest, write_signed_release,
};

/// The first RUNPATH entry of Quorum's executables (client/build.rs): the bundle's `lib/`.
const ORIGIN_LIB: &[u8] = b"$ORIGIN/../lib";

/// What to bundle.
#[derive(Debug, Clone, Copy)]
pub struct BundleRequest<'a> {
    /// The executable, built in this tree.
    pub binary: &'a Path,
    /// Release version.
    pub version: &'a str,
    /// Source commit.
    pub commit: &'a str,
    /// The release signing key (PKCS#8 Ed25519).
    pub key: &'a Path,
    /// Where the archive is written.
    pub out_dir: &'a Path,
    /// Also ship LibTorch's CUDA backend (`libtorch_cuda.so` and the NVIDIA libraries it
    /// needs), which the client loads when it starts on a GPU.
    pub cuda: bool,
}

/// A written bundle.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The `.tar.gz` archive.
    pub archive: PathBuf,
    /// Its signed manifest (also inside it, at `bin/<name>.release.json`).
    pub release: SignedRelease,
}

/// The bundle's name, which is also its folder's: `<binary>-<version>-<arch>-linux[-cuda]`.
pub fn bundle_name(binary: &str, version: &str, cuda: bool) -> String {
    let flavour = if cuda { "-cuda" } else { "" };
    format!(
        "{binary}-{version}-{}-linux{flavour}",
        std::env::consts::ARCH
    )
}

/// Builds, signs and archives a bundle (layout in the module documentation).
pub fn build_bundle(request: &BundleRequest<'_>) -> Result<Bundle> {
    let binary_name = request
        .binary
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| invalid(request.binary, "the binary path names no file"))?;
    let name = bundle_name(&binary_name, request.version, request.cuda);
    let libraries = libraries_to_ship(request)?;

    crate::files::create_dir_all(request.out_dir)?;
    let staging = tempfile::Builder::new()
        .prefix(".bundle-")
        .tempdir_in(request.out_dir)
        .map_err(|e| AttestError::io("create staging folder in", request.out_dir, e))?;
    let root = staging.path().join(&name);
    let (bin, lib) = (root.join("bin"), root.join("lib"));
    crate::files::create_dir_all(&bin)?;
    crate::files::create_dir_all(&lib)?;

    let mut executable = crate::files::read(request.binary)?;
    strip_build_runpath(&mut executable, request.binary)?;
    let bundled_binary = bin.join(&binary_name);
    write_executable(&bundled_binary, &executable)?;

    let mut pinned = Vec::with_capacity(libraries.len());
    for library in &libraries {
        let file_name = library
            .file_name()
            .ok_or_else(|| invalid(library, "a library path names no file"))?;
        let target = lib.join(file_name);
        fs::copy(library, &target).map_err(|e| AttestError::io("copy", library, e))?;
        pinned.push(FileDigest {
            path: format!("lib/{}", file_name.to_string_lossy()),
            sha256: sha256_file(&target)?,
        });
    }
    pinned.sort();

    let manifest = ReleaseManifest {
        name: binary_name,
        version: request.version.to_owned(),
        commit: request.commit.to_owned(),
        binary_sha256: sha256_file(&bundled_binary)?,
        created: time::OffsetDateTime::now_utc().unix_timestamp(),
        libraries: pinned,
    };
    let release = sign_manifest(manifest, request.key)?;
    write_signed_release(&release, &SignedRelease::path_for(&bundled_binary))?;

    let archive = request.out_dir.join(format!("{name}.tar.gz"));
    write_archive(&root, &name, &archive)?;
    Ok(Bundle { archive, release })
}

/// The libraries the bundle ships: the executable's non-system dependencies and, for CUDA,
/// LibTorch's CUDA backend with its own.
fn libraries_to_ship(request: &BundleRequest<'_>) -> Result<Vec<PathBuf>> {
    let mut libraries = library_closure(request.binary)?;
    if request.cuda {
        let backend = libraries
            .iter()
            .find(|l| l.file_name().is_some_and(|n| n == "libtorch_cpu.so"))
            .map(|cpu| cpu.with_file_name("libtorch_cuda.so"))
            .ok_or_else(|| invalid(request.binary, "it does not load libtorch_cpu.so"))?;
        libraries.extend(library_closure(&backend)?);
        libraries.push(backend);
    }
    let mut by_name = BTreeMap::new();
    for library in libraries {
        let name = library.file_name().map(|n| n.to_owned());
        match by_name.insert(name, library.clone()) {
            Some(other) if other != library => {
                return Err(invalid(
                    &library,
                    &format!("it has the same file name as {}", other.display()),
                ));
            }
            _ => {}
        }
    }
    Ok(by_name.into_values().collect())
}

/// The non-system shared libraries `binary` loads, as the dynamic loader resolves them (`ldd`).
fn library_closure(binary: &Path) -> Result<Vec<PathBuf>> {
    let output = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| AttestError::io("run ldd on", binary, e))?;
    if !output.status.success() {
        return Err(AttestError::ToolFailed {
            tool: "ldd",
            path: binary.to_owned(),
            reason: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    parse_ldd(&String::from_utf8_lossy(&output.stdout)).map_err(|missing| AttestError::ToolFailed {
        tool: "ldd",
        path: binary.to_owned(),
        reason: format!(
            "{missing} not found; build in this tree (`make build`) so its RUNPATH finds it"
        ),
    })
}

/// Resolved, non-system paths in `ldd` output; `Err` names a library that was not found.
fn parse_ldd(output: &str) -> std::result::Result<Vec<PathBuf>, String> {
    let mut found = Vec::new();
    for line in output.lines() {
        let Some((name, rest)) = line.trim().split_once(" => ") else {
            // The vDSO and the loader itself: "name (0x…)".
            continue;
        };
        if rest.trim() == "not found" {
            return Err(name.to_owned());
        }
        let path = Path::new(rest.split(" (0x").next().unwrap_or(rest).trim());
        if !is_system_library(path) {
            found.push(path.to_owned());
        }
    }
    Ok(found)
}

/// Whether `path` is in one of the system's library folders (`/lib`, `/lib64`, `/usr/lib`,
/// `/usr/lib64`, or a `*-linux-gnu` folder directly under `/lib` or `/usr/lib`). Bundles ship,
/// and clients measure, every other library.
fn is_system_library(path: &Path) -> bool {
    const SYSTEM_DIRS: [&str; 4] = ["/lib", "/lib64", "/usr/lib", "/usr/lib64"];
    let Some(dir) = path.parent() else {
        return false;
    };
    let multiarch = dir
        .file_name()
        .is_some_and(|n| n.to_string_lossy().ends_with("-linux-gnu"))
        && dir
            .parent()
            .is_some_and(|p| p == Path::new("/lib") || p == Path::new("/usr/lib"));
    multiarch || SYSTEM_DIRS.iter().any(|d| dir == Path::new(d))
}

/// Blanks every RUNPATH entry after `$ORIGIN/../lib` (the build tree's LibTorch folder), in
/// place and keeping the file's layout, so that a bundled executable finds libraries in its
/// bundle or nowhere. An executable without that entry (one that loads no LibTorch) is left
/// as it is.
fn strip_build_runpath(executable: &mut [u8], path: &Path) -> Result<()> {
    let mut prefix = ORIGIN_LIB.to_vec();
    prefix.push(b':');
    let starts: Vec<usize> = executable
        .windows(prefix.len())
        .enumerate()
        .filter(|(_, w)| *w == prefix.as_slice())
        .map(|(i, _)| i)
        .collect();
    match starts.as_slice() {
        [] => Ok(()),
        [start] => {
            let tail = start + ORIGIN_LIB.len();
            let end = executable[tail..]
                .iter()
                .position(|&b| b == 0)
                .map(|n| tail + n)
                .ok_or_else(|| invalid(path, "its RUNPATH is not NUL-terminated"))?;
            executable[tail..end].fill(0);
            Ok(())
        }
        _ => Err(invalid(
            path,
            "`$ORIGIN/../lib:` occurs more than once; cannot tell which is the RUNPATH",
        )),
    }
}

fn write_executable(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::write(path, bytes).map_err(|e| AttestError::io("write", path, e))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
        .map_err(|e| AttestError::io("make executable", path, e))
}

/// Writes `root` as `name/…` into a gzip'd tar at `archive`, through a temporary file so that
/// a crash leaves no half archive under the final name.
fn write_archive(root: &Path, name: &str, archive: &Path) -> Result<()> {
    let partial = archive.with_extension("gz.partial");
    let io_error = |e: io::Error| AttestError::io("write", &partial, e);
    let file = File::create(&partial).map_err(io_error)?;
    // Fast compression: LibTorch's libraries shrink little more at higher levels.
    let mut tar = tar::Builder::new(GzEncoder::new(BufWriter::new(file), Compression::fast()));
    tar.mode(tar::HeaderMode::Deterministic);
    tar.follow_symlinks(false);
    tar.append_dir_all(name, root).map_err(io_error)?;
    let file = tar
        .into_inner()
        .and_then(GzEncoder::finish)
        .and_then(|w| w.into_inner().map_err(io::IntoInnerError::into_error))
        .map_err(io_error)?;
    file.sync_all().map_err(io_error)?;
    fs::rename(&partial, archive).map_err(|e| AttestError::io("rename", &partial, e))
}

/// Checks a bundle, as an archive or as the folder it was extracted to: a trusted signature on
/// an allowed version, and exactly the listed files with the listed digests. Returns the
/// verified manifest.
pub fn verify_bundle(
    bundle: &Path,
    trusted_keys: &[String],
    allowed_versions: &[String],
) -> Result<ReleaseManifest> {
    let contents = if bundle.is_dir() {
        read_folder(bundle)?
    } else {
        read_archive(bundle)?
    };
    contents.check(bundle, trusted_keys, allowed_versions)
}

/// What a bundle holds: each file's path inside it and digest, and its signed release.
#[derive(Default)]
struct Contents {
    files: BTreeMap<String, String>,
    releases: Vec<(String, Vec<u8>)>,
}

impl Contents {
    fn add(&mut self, path: String, mut reader: impl Read) -> io::Result<()> {
        if path.starts_with("bin/") && path.ends_with(RELEASE_SUFFIX) {
            let mut bytes = Vec::new();
            reader.read_to_end(&mut bytes)?;
            self.releases.push((path, bytes));
            return Ok(());
        }
        self.files.insert(path, sha256_reader(reader)?);
        Ok(())
    }

    fn check(
        mut self,
        bundle: &Path,
        trusted_keys: &[String],
        allowed_versions: &[String],
    ) -> Result<ReleaseManifest> {
        let (release_path, json) = match self.releases.as_slice() {
            [one] => one.clone(),
            [] => return Err(invalid(bundle, "it holds no bin/*.release.json")),
            _ => return Err(invalid(bundle, "it holds more than one bin/*.release.json")),
        };
        let release: SignedRelease =
            serde_json::from_slice(&json).map_err(|source| AttestError::Json {
                what: "signed release",
                source,
            })?;
        let manifest = release.verify_signature(trusted_keys, allowed_versions)?;
        let binary = format!("bin/{}", manifest.name);
        if release_path != format!("{binary}{RELEASE_SUFFIX}") {
            return Err(invalid(
                bundle,
                &format!("{release_path} signs {}, not its own binary", manifest.name),
            ));
        }
        let listed = std::iter::once((binary, &manifest.binary_sha256)).chain(
            manifest
                .libraries
                .iter()
                .map(|l| (l.path.clone(), &l.sha256)),
        );
        for (path, expected) in listed {
            match self.files.remove(&path) {
                None => return Err(invalid(bundle, &format!("{path} is missing"))),
                Some(actual) if !actual.eq_ignore_ascii_case(expected) => {
                    return Err(invalid(
                        bundle,
                        &format!("{path} has SHA-256 {actual}, the manifest says {expected}"),
                    ));
                }
                Some(_) => {}
            }
        }
        if let Some(extra) = self.files.keys().next() {
            return Err(invalid(
                bundle,
                &format!("{extra} is not in the signed manifest"),
            ));
        }
        Ok(manifest.clone())
    }
}

/// Reads a `.tar.gz` bundle: one top folder, only folders and regular files below it.
fn read_archive(archive: &Path) -> Result<Contents> {
    let io_error = |e: io::Error| AttestError::io("read", archive, e);
    let file = File::open(archive).map_err(io_error)?;
    let mut tar = tar::Archive::new(GzDecoder::new(file));
    let mut contents = Contents::default();
    let mut top: Option<String> = None;
    for entry in tar.entries().map_err(io_error)? {
        let entry = entry.map_err(io_error)?;
        let path = entry.path().map_err(io_error)?.into_owned();
        let mut parts = Vec::new();
        for component in path.components() {
            match component {
                Component::Normal(part) => parts.push(part.to_string_lossy().into_owned()),
                Component::CurDir => {}
                _ => {
                    return Err(invalid(
                        archive,
                        &format!("{} leaves the bundle's folder", path.display()),
                    ));
                }
            }
        }
        let Some((first, rest)) = parts.split_first() else {
            continue;
        };
        match &top {
            None => top = Some(first.clone()),
            Some(top) if top != first => {
                return Err(invalid(
                    archive,
                    &format!("{} is outside its folder {top}", path.display()),
                ));
            }
            Some(_) => {}
        }
        match entry.header().entry_type() {
            tar::EntryType::Directory => {}
            tar::EntryType::Regular if !rest.is_empty() => {
                contents.add(rest.join("/"), entry).map_err(io_error)?;
            }
            kind => {
                return Err(invalid(
                    archive,
                    &format!("{} is a {kind:?} entry, not a regular file", path.display()),
                ));
            }
        }
    }
    Ok(contents)
}

/// Reads an extracted bundle: only folders and regular files (no links).
fn read_folder(root: &Path) -> Result<Contents> {
    let mut contents = Contents::default();
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        let entries = fs::read_dir(&dir).map_err(|e| AttestError::io("read", &dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| AttestError::io("read", &dir, e))?;
            let path = entry.path();
            let kind = entry
                .file_type()
                .map_err(|e| AttestError::io("read", &path, e))?;
            let relative = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .to_string_lossy()
                .into_owned();
            if kind.is_dir() {
                pending.push(path);
            } else if kind.is_file() {
                let file = File::open(&path).map_err(|e| AttestError::io("read", &path, e))?;
                contents
                    .add(relative, file)
                    .map_err(|e| AttestError::io("read", &path, e))?;
            } else {
                return Err(invalid(
                    root,
                    &format!("{relative} is a link or special file, not a regular file"),
                ));
            }
        }
    }
    Ok(contents)
}

/// The non-system shared libraries mapped into this process, each with its SHA-256: what a
/// client run from a bundle reports at join.
pub fn measure_loaded_libraries() -> Result<Vec<FileDigest>> {
    let maps_path = Path::new("/proc/self/maps");
    let maps = fs::read_to_string(maps_path).map_err(|e| AttestError::io("read", maps_path, e))?;
    mapped_libraries(&maps)
        .into_iter()
        .map(|path| {
            Ok(FileDigest {
                sha256: sha256_file(&path)?,
                path: path.to_string_lossy().into_owned(),
            })
        })
        .collect()
}

/// The distinct non-system shared libraries named in a `/proc/<pid>/maps` text, sorted.
fn mapped_libraries(maps: &str) -> Vec<PathBuf> {
    let mut libraries: Vec<PathBuf> = maps
        .lines()
        // address perms offset dev inode, then the path (which may contain spaces).
        .filter_map(|line| line.splitn(6, ' ').nth(5).map(str::trim_start))
        .filter(|path| path.starts_with('/') && !path.ends_with(" (deleted)"))
        .map(PathBuf::from)
        .filter(|path| {
            path.file_name()
                .is_some_and(|n| n.to_string_lossy().contains(".so"))
                && !is_system_library(path)
        })
        .collect();
    libraries.sort();
    libraries.dedup();
    libraries
}

fn invalid(bundle: &Path, problem: &str) -> AttestError {
    AttestError::BundleInvalid {
        bundle: bundle.to_owned(),
        problem: problem.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;
    use crate::release::generate_release_key;

    struct Signed {
        dir: tempfile::TempDir,
        root: PathBuf,
        trusted: Vec<String>,
    }

    const LIBRARIES: [(&str, &[u8]); 2] =
        [("lib/libtorch_cpu.so", b"torch"), ("lib/libc10.so", b"c10")];

    /// An extracted bundle written by hand: a binary, two libraries and their signed manifest.
    fn signed_folder() -> Signed {
        let dir = tempfile::tempdir().unwrap();
        let key = generate_release_key(&dir.path().join("release.key")).unwrap();
        let root = dir.path().join("quorum-client-1.0.0-x86_64-linux");
        fs::create_dir_all(root.join("bin")).unwrap();
        fs::create_dir_all(root.join("lib")).unwrap();
        let binary = root.join("bin/quorum-client");
        fs::write(&binary, b"client").unwrap();
        let mut libraries = Vec::new();
        for (path, bytes) in LIBRARIES {
            fs::write(root.join(path), bytes).unwrap();
            libraries.push(FileDigest {
                path: path.into(),
                sha256: sha256_file(&root.join(path)).unwrap(),
            });
        }
        let manifest = ReleaseManifest {
            name: "quorum-client".into(),
            version: "1.0.0".into(),
            commit: "abc".into(),
            binary_sha256: sha256_file(&binary).unwrap(),
            created: 0,
            libraries,
        };
        let signed = sign_manifest(manifest, &key.key_path).unwrap();
        write_signed_release(&signed, &SignedRelease::path_for(&binary)).unwrap();
        Signed {
            dir,
            root,
            trusted: vec![key.public_key],
        }
    }

    impl Signed {
        fn verify(&self, bundle: &Path) -> Result<ReleaseManifest> {
            verify_bundle(bundle, &self.trusted, &[])
        }

        fn problem(&self, bundle: &Path) -> String {
            match self.verify(bundle) {
                Err(AttestError::BundleInvalid { problem, .. }) => problem,
                other => panic!("expected an invalid bundle, got {other:?}"),
            }
        }

        fn archive(&self) -> PathBuf {
            let archive = self.dir.path().join("bundle.tar.gz");
            let name = self
                .root
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            write_archive(&self.root, &name, &archive).unwrap();
            archive
        }
    }

    #[test]
    fn bundle_folder_and_archive_verify_and_name_their_libraries() {
        let signed = signed_folder();
        let manifest = signed.verify(&signed.root).unwrap();
        assert_eq!(manifest.version, "1.0.0");
        let pinned: Vec<_> = manifest
            .libraries
            .iter()
            .map(FileDigest::file_name)
            .collect();
        assert_eq!(pinned, ["libtorch_cpu.so", "libc10.so"]);
        assert_eq!(signed.verify(&signed.archive()).unwrap(), manifest);
        // A version list that leaves it out refuses it.
        assert!(matches!(
            verify_bundle(&signed.root, &signed.trusted, &["2.0.0".into()]),
            Err(AttestError::VersionNotAllowed { .. })
        ));
        assert!(matches!(
            verify_bundle(&signed.root, &["11".repeat(32)], &[]),
            Err(AttestError::ReleaseKeyUntrusted { .. })
        ));
    }

    #[test]
    fn bundle_with_a_swapped_missing_or_extra_file_is_refused() {
        let signed = signed_folder();
        fs::write(signed.root.join("lib/libc10.so"), b"c10, patched").unwrap();
        let problem = signed.problem(&signed.root);
        assert!(
            problem.starts_with("lib/libc10.so has SHA-256 "),
            "{problem}"
        );
        assert!(
            signed
                .problem(&signed.archive())
                .starts_with("lib/libc10.so has")
        );

        let signed = signed_folder();
        fs::remove_file(signed.root.join("lib/libtorch_cpu.so")).unwrap();
        assert_eq!(
            signed.problem(&signed.root),
            "lib/libtorch_cpu.so is missing"
        );

        let signed = signed_folder();
        fs::write(signed.root.join("lib/libpreload.so"), b"extra").unwrap();
        assert_eq!(
            signed.problem(&signed.root),
            "lib/libpreload.so is not in the signed manifest"
        );

        let signed = signed_folder();
        fs::write(signed.root.join("bin/quorum-client"), b"client, patched").unwrap();
        assert!(
            signed
                .problem(&signed.root)
                .starts_with("bin/quorum-client has SHA-256")
        );
    }

    #[test]
    fn bundle_links_and_paths_outside_the_folder_are_refused() {
        let signed = signed_folder();
        fs::remove_file(signed.root.join("lib/libc10.so")).unwrap();
        symlink("/usr/lib/libc10.so", signed.root.join("lib/libc10.so")).unwrap();
        assert_eq!(
            signed.problem(&signed.root),
            "lib/libc10.so is a link or special file, not a regular file"
        );
        let archive = signed.archive();
        assert!(signed.problem(&archive).contains("is a Symlink entry"));

        // An archive entry that climbs out of the folder.
        let signed = signed_folder();
        let archive = signed.dir.path().join("escape.tar.gz");
        let mut tar = tar::Builder::new(GzEncoder::new(
            File::create(&archive).unwrap(),
            Compression::fast(),
        ));
        let mut header = tar::Header::new_gnu();
        header.set_size(1);
        header.set_entry_type(tar::EntryType::Regular);
        // `append_data` refuses "..", so the name goes into the header by hand.
        header.as_old_mut().name[..12].copy_from_slice(b"a/../../evil");
        header.set_cksum();
        tar.append(&header, &b"x"[..]).unwrap();
        tar.into_inner().unwrap().finish().unwrap();
        assert_eq!(
            signed.problem(&archive),
            "a/../../evil leaves the bundle's folder"
        );
    }

    #[test]
    fn bundle_of_a_system_only_binary_ships_no_libraries_and_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let key = generate_release_key(&dir.path().join("release.key")).unwrap();
        let bundle = build_bundle(&BundleRequest {
            binary: Path::new("/bin/true"),
            version: "1.0.0",
            commit: "abc",
            key: &key.key_path,
            out_dir: &dir.path().join("dist"),
            cuda: false,
        })
        .unwrap();
        let name = format!("true-1.0.0-{}-linux.tar.gz", std::env::consts::ARCH);
        assert_eq!(bundle.archive, dir.path().join("dist").join(name));
        assert!(bundle.release.manifest.libraries.is_empty());
        let manifest =
            verify_bundle(&bundle.archive, std::slice::from_ref(&key.public_key), &[]).unwrap();
        assert_eq!(manifest, bundle.release.manifest);
        // Only the archive is left behind.
        assert_eq!(fs::read_dir(dir.path().join("dist")).unwrap().count(), 1);
    }

    #[test]
    fn bundle_runpath_keeps_only_the_bundle_folder() {
        let mut exe = b"\x7fELF\0$ORIGIN/../lib:/build/.venv/torch/lib\0tail".to_vec();
        let before = exe.len();
        strip_build_runpath(&mut exe, Path::new("exe")).unwrap();
        assert_eq!(exe.len(), before);
        let blanked = [0; ":/build/.venv/torch/lib".len()];
        let expected = [&b"\x7fELF\0$ORIGIN/../lib"[..], &blanked, b"\0tail"].concat();
        assert_eq!(exe, expected);
        // Already stripped, or never given one: left alone.
        let unchanged = exe.clone();
        strip_build_runpath(&mut exe, Path::new("exe")).unwrap();
        assert_eq!(exe, unchanged);
        let mut twice = b"$ORIGIN/../lib:/a\0$ORIGIN/../lib:/b\0".to_vec();
        assert!(strip_build_runpath(&mut twice, Path::new("exe")).is_err());
    }

    #[test]
    fn bundle_ships_what_ldd_resolves_outside_the_system_folders() {
        let output = "\tlinux-vdso.so.1 (0x00007ffd)\n\
            \tlibtorch_cpu.so => /opt/venv/torch/lib/libtorch_cpu.so (0x00007f00)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f01)\n\
            \tlibcudart.so.13 => /opt/venv/torch/lib/../../nvidia/cu13/lib/libcudart.so.13 (0x1)\n\
            \t/lib64/ld-linux-x86-64.so.2 (0x00007f02)\n";
        assert_eq!(
            parse_ldd(output).unwrap(),
            [
                PathBuf::from("/opt/venv/torch/lib/libtorch_cpu.so"),
                PathBuf::from("/opt/venv/torch/lib/../../nvidia/cu13/lib/libcudart.so.13"),
            ]
        );
        let missing = "\tlibc10.so => not found\n";
        assert_eq!(parse_ldd(missing).unwrap_err(), "libc10.so");
    }

    #[test]
    fn bundle_system_library_folders_are_the_loaders_own() {
        for system in [
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/usr/lib/x86_64-linux-gnu/libstdc++.so.6",
            "/lib64/ld-linux-x86-64.so.2",
            "/usr/lib/libm.so.6",
        ] {
            assert!(is_system_library(Path::new(system)), "{system}");
        }
        for other in [
            "/usr/lib/python3/dist-packages/torch/lib/libtorch_cpu.so",
            "/usr/local/lib/libtorch_cpu.so",
            "/tmp/x86_64-linux-gnu/libevil.so",
            "/opt/quorum/lib/libc10.so",
        ] {
            assert!(!is_system_library(Path::new(other)), "{other}");
        }
    }

    #[test]
    fn bundle_measures_mapped_libraries_once_each() {
        let maps = "\
55d0-55d1 r--p 00000000 fd:01 1 /opt/quorum/bin/quorum-client\n\
7f00-7f01 r--p 00000000 fd:01 2 /opt/quorum/lib/libtorch_cpu.so\n\
7f01-7f02 r-xp 00001000 fd:01 2 /opt/quorum/lib/libtorch_cpu.so\n\
7f02-7f03 r--p 00000000 fd:01 3 /lib/x86_64-linux-gnu/libc.so.6\n\
7f03-7f04 r--p 00000000 fd:01 4    /tmp/with space/libpreload.so\n\
7f04-7f05 r--p 00000000 fd:01 5 /opt/quorum/lib/libold.so (deleted)\n\
7f05-7f06 rw-p 00000000 00:00 0 \n\
7ffd-7ffe rw-p 00000000 00:00 0                          [stack]\n";
        assert_eq!(
            mapped_libraries(maps),
            [
                PathBuf::from("/opt/quorum/lib/libtorch_cpu.so"),
                PathBuf::from("/tmp/with space/libpreload.so"),
            ]
        );
        // This test process maps its own libraries; none of them is a system one.
        let own = measure_loaded_libraries().unwrap();
        assert!(own.iter().all(|l| !is_system_library(Path::new(&l.path))));
    }
}
