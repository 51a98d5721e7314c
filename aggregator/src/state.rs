//! The aggregator's durable state: one checkpoint per completed round, a small JSON file naming
//! the last completed round and its privacy spend, and the outer optimizer's buffers. Each
//! file is written to a temporary name, synced and renamed, so a crash leaves either the old
//! state or the new one, never a torn file.

use std::{
    collections::HashMap,
    fs,
    io::{Read as _, Write},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use quorum_crypto::digest::Sha256;
use serde::{Deserialize, Serialize};

use crate::{engine::RoundSummary, model_store::FlatModel, outer::OuterState};

/// What survives a restart.
#[derive(Debug, Clone)]
pub struct PersistedState {
    /// Round id of the newest checkpoint (0: none yet, the initial model).
    pub last_checkpoint: u32,
    /// Next round id to use; ids of aborted attempts are never reused.
    pub next_round: u32,
    /// zCDP ρ spent per round.
    pub rhos: Vec<(u32, f64)>,
    /// Outer optimizer buffers.
    pub outer_state: OuterState,
    /// Summaries of the completed rounds.
    pub history: Vec<RoundSummary>,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    last_checkpoint: u32,
    next_round: u32,
    rhos: Vec<(u32, f64)>,
    history: Vec<RoundSummary>,
}

/// The state folder.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    /// Opens (creating) the folder.
    pub fn new(root: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(root.join("checkpoints"))
            .with_context(|| format!("cannot create state folder {}", root.display()))?;
        Ok(Self {
            root: root.to_owned(),
        })
    }

    fn state_path(&self) -> PathBuf {
        self.root.join("state.json")
    }

    fn outer_path(&self) -> PathBuf {
        self.root.join("outer_state.safetensors")
    }

    /// Path of the initial model, copied here when the federation starts so that sites download
    /// it from the state folder like every later model.
    pub fn initial_model_path(&self) -> PathBuf {
        self.root.join("initial.safetensors")
    }

    /// Path of the checkpoint written after `round`.
    pub fn checkpoint_path(&self, round: u32) -> PathBuf {
        self.root
            .join("checkpoints")
            .join(format!("round-{round:04}.safetensors"))
    }

    /// Writes `model` as the checkpoint of `round`, streamed (no copy of the model in memory);
    /// returns its path, SHA-256 and size in bytes.
    pub fn write_model(
        &self,
        round: u32,
        model: &FlatModel,
    ) -> anyhow::Result<(PathBuf, [u8; 32], u64)> {
        let path = self.checkpoint_path(round);
        let (mut digest, mut written) = (Sha256::new(), 0);
        quorum_durable::replace_with(&path, quorum_durable::Mode::Public, |file| {
            model.write_safetensors(&mut HashingWriter {
                inner: file,
                digest: &mut digest,
                written: &mut written,
            })
        })
        .with_context(|| format!("cannot write {} (disk full?)", path.display()))?;
        Ok((path, digest.finish(), written))
    }

    /// Reads the checkpoint of `round`.
    pub fn read_checkpoint(&self, round: u32) -> anyhow::Result<Vec<u8>> {
        let path = self.checkpoint_path(round);
        fs::read(&path).with_context(|| format!("cannot read checkpoint {}", path.display()))
    }

    /// Loads the state of the last completed round, if any.
    pub fn load(&self) -> anyhow::Result<Option<PersistedState>> {
        let path = self.state_path();
        let text = match fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let file: StateFile = serde_json::from_slice(&text).with_context(|| {
            format!(
                "{} is corrupt; restore it from backup or move the state folder away",
                path.display()
            )
        })?;
        let outer_path = self.outer_path();
        let outer_state = match fs::File::open(&outer_path) {
            Ok(file) => read_outer(file).with_context(|| {
                format!(
                    "cannot read the outer optimizer state {}; restore it from backup",
                    outer_path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => OuterState::default(),
            Err(e) => return Err(e).context("cannot read the outer optimizer state"),
        };
        Ok(Some(PersistedState {
            last_checkpoint: file.last_checkpoint,
            next_round: file.next_round,
            rhos: file.rhos,
            outer_state,
            history: file.history,
        }))
    }

    /// Saves the state; the round's checkpoint must already be written.
    pub fn save(&self, state: &PersistedState) -> anyhow::Result<()> {
        let outer_path = self.outer_path();
        quorum_durable::replace_with(&outer_path, quorum_durable::Mode::Public, |file| {
            write_outer(file, &state.outer_state)
        })
        .with_context(|| format!("cannot write {} (disk full?)", outer_path.display()))?;
        let file = StateFile {
            last_checkpoint: state.last_checkpoint,
            next_round: state.next_round,
            rhos: state.rhos.clone(),
            history: state.history.clone(),
        };
        write_atomic(&self.state_path(), &serde_json::to_vec_pretty(&file)?)
    }
}

/// The outer optimizer's buffers as a safetensors file, streamed: no copy of them is made.
fn write_outer(out: &mut dyn Write, state: &OuterState) -> std::io::Result<()> {
    let (m, v) = (&state.momentum, &state.second_moment);
    let shapes = [[m.len()], [v.len()]];
    // Sorted by name, as safetensors lays tensors out.
    let tensors = vec![
        ("momentum", &shapes[0][..], m.as_slice()),
        ("second_moment", &shapes[1][..], v.as_slice()),
    ];
    crate::model_store::write_f32_safetensors(out, &HashMap::new(), tensors)
}

/// Reads what [`write_outer`] wrote, each buffer straight into its vector (the file is never
/// in memory whole: with FedAdam it is 8 bytes per parameter).
fn read_outer(file: fs::File) -> anyhow::Result<OuterState> {
    #[derive(Deserialize)]
    struct Entry {
        dtype: String,
        data_offsets: [u64; 2],
    }
    let size = file.metadata()?.len();
    let mut reader = std::io::BufReader::new(file);
    let mut len = [0u8; 8];
    reader.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    anyhow::ensure!(
        len <= size.saturating_sub(8).min(1 << 16),
        "header length {len} is invalid"
    );
    let mut header = vec![0; len as usize];
    reader.read_exact(&mut header)?;
    let mut entries: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)?;
    let data_len = size - 8 - len;
    let mut position = 0;
    let mut read = |name: &str| -> anyhow::Result<Vec<f32>> {
        let entry: Entry = serde_json::from_value(
            entries
                .remove(name)
                .with_context(|| format!("no tensor '{name}'"))?,
        )?;
        let [start, end] = entry.data_offsets;
        anyhow::ensure!(
            entry.dtype == "F32"
                && start == position
                && start <= end
                && end <= data_len
                && (end - start) % 4 == 0,
            "tensor '{name}' is not f32 values at bytes {position}.. of the data"
        );
        let mut values = vec![0f32; ((end - start) / 4) as usize];
        reader.read_exact(bytemuck::cast_slice_mut(&mut values))?;
        position = end;
        Ok(values)
    };
    Ok(OuterState {
        momentum: read("momentum")?,
        second_moment: read("second_moment")?,
    })
}

/// Passes writes through to `inner`, hashing and counting what was written.
struct HashingWriter<'a> {
    inner: &'a mut dyn std::io::Write,
    digest: &'a mut Sha256,
    written: &'a mut u64,
}

impl std::io::Write for HashingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.digest.update(&buf[..n]);
        *self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes `bytes` to `path` via a synced temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    quorum_durable::replace(path, bytes, quorum_durable::Mode::Public)
        .with_context(|| format!("cannot write {} (disk full?)", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streamed_checkpoint_is_what_its_digest_and_size_say() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = StateDir::new(dir.path()).unwrap();
        // A model of 1.5M values: the writer's buffer and chunks fill many times over.
        let values: Vec<f32> = (0..1_500_000).map(|i| i as f32 * 0.5 - 7.0).collect();
        let layout = vec![
            crate::model_store::TensorSlot {
                name: "a".into(),
                shape: vec![1000, 1000],
            },
            crate::model_store::TensorSlot {
                name: "b".into(),
                shape: vec![500_000],
            },
        ];
        let metadata = [("quorum.model_config".to_owned(), "{}".to_owned())].into();
        let model = FlatModel {
            values,
            layout,
            metadata,
        };
        let (path, sha256, size) = state_dir.write_model(4, &model).unwrap();
        assert_eq!(path, state_dir.checkpoint_path(4));
        let bytes = fs::read(&path).unwrap();
        assert_eq!(
            (size, sha256),
            (bytes.len() as u64, quorum_crypto::digest::sha256(&bytes))
        );
        let back = FlatModel::from_safetensors(&bytes).unwrap();
        assert_eq!(back.values, model.values);
        assert_eq!((back.layout, back.metadata), (model.layout, model.metadata));
    }

    #[test]
    fn state_round_trips_and_missing_state_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = StateDir::new(dir.path()).unwrap();
        assert!(state_dir.load().unwrap().is_none());
        let state = PersistedState {
            last_checkpoint: 3,
            next_round: 5,
            rhos: vec![(1, 0.1), (2, 0.1), (3, 0.2)],
            outer_state: OuterState {
                momentum: vec![1.0, -2.0],
                second_moment: vec![],
            },
            // A round without DP has no ε: it must survive the JSON round trip.
            history: vec![RoundSummary {
                round: 3,
                evaluation_only: false,
                survivors: vec!["a".into()],
                dropped: vec![],
                seconds: 1.5,
                upload_bytes: 10,
                download_bytes: 20,
                epsilon: None,
                rho: 0.0,
                model_sha256: String::new(),
                reports: Default::default(),
                metrics: None,
            }],
        };
        state_dir.save(&state).unwrap();
        let loaded = state_dir.load().unwrap().unwrap();
        assert_eq!((loaded.last_checkpoint, loaded.next_round), (3, 5));
        assert_eq!(loaded.rhos, state.rhos);
        assert_eq!(loaded.outer_state, state.outer_state);
        assert_eq!(loaded.history.len(), 1);
        assert_eq!(loaded.history[0].epsilon, None);
    }

    #[test]
    fn outer_state_is_a_safetensors_file_and_a_torn_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = StateDir::new(dir.path()).unwrap();
        let outer = OuterState {
            momentum: (0..300_000).map(|i| i as f32 - 0.25).collect(),
            second_moment: (0..300_000).map(|i| i as f32 * 2.0).collect(),
        };
        let state = PersistedState {
            last_checkpoint: 1,
            next_round: 2,
            rhos: vec![],
            outer_state: outer.clone(),
            history: vec![],
        };
        state_dir.save(&state).unwrap();
        let bytes = fs::read(state_dir.outer_path()).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let second = file.tensor("second_moment").unwrap();
        assert_eq!(second.shape(), [300_000]);
        assert_eq!(
            second.data(),
            bytemuck::cast_slice::<f32, u8>(&outer.second_moment)
        );
        assert_eq!(state_dir.load().unwrap().unwrap().outer_state, outer);

        fs::write(state_dir.outer_path(), &bytes[..bytes.len() - 4]).unwrap();
        let err = format!("{:#}", state_dir.load().unwrap_err());
        assert!(
            err.contains("outer optimizer state") && err.contains("restore"),
            "{err}"
        );
    }

    #[test]
    fn corrupt_state_is_an_error_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = StateDir::new(dir.path()).unwrap();
        fs::write(dir.path().join("state.json"), b"{ torn").unwrap();
        let err = state_dir.load().unwrap_err().to_string();
        assert!(err.contains("corrupt"), "{err}");
    }
}
