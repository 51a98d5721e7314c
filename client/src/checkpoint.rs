//! Checkpoints: the disk and wire format shared with the aggregator.
//!
//! A checkpoint is a safetensors file of float32 tensors named as in Hugging Face's
//! `LlamaForCausalLM` (see [`ModelConfig::tensor_specs`]), with the metadata key
//! [`CONFIG_KEY`] holding the JSON of the [`ModelConfig`].
//!
//! **Canonical flat order** (the aggregator relies on it): the tensors sorted byte-wise by name,
//! each flattened row-major, concatenated. Pseudo-gradients and masked updates are vectors in that
//! order. [`encode`] and [`decode`] convert between the file and (config, flat vector) without
//! LibTorch; the other functions move values in and out of a `VarStore`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use tch::{Device, Kind, TchError, Tensor, nn::VarStore};

use crate::model::{ModelConfig, ModelError};

/// Metadata key holding the model configuration as JSON.
pub const CONFIG_KEY: &str = "quorum.model_config";

/// Standard deviation of the initial weight matrices (Llama's `initializer_range`).
pub const INIT_STD: f64 = 0.02;

/// Errors raised while reading or writing checkpoints.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The bytes are not a valid safetensors file.
    #[error("checkpoint is not a valid safetensors file: {0}")]
    NotSafetensors(String),
    /// The metadata lacks the model configuration.
    #[error("checkpoint has no \"{CONFIG_KEY}\" metadata; it was not written by Quorum")]
    MissingConfig,
    /// The configuration metadata does not parse or is invalid.
    #[error("checkpoint model config is invalid: {0}")]
    BadConfig(String),
    /// A tensor is not float32.
    #[error("checkpoint tensor {name} is {dtype}, expected F32")]
    NotFloat32 {
        /// Tensor name.
        name: String,
        /// Its dtype.
        dtype: String,
    },
    /// The tensor names differ from the model's.
    #[error("checkpoint tensors do not match the model: missing {missing:?}, unexpected {extra:?}")]
    NamesDiffer {
        /// Names the model has and the checkpoint lacks.
        missing: Vec<String>,
        /// Names the checkpoint has and the model lacks.
        extra: Vec<String>,
    },
    /// A tensor has the wrong shape.
    #[error("checkpoint tensor {name} has shape {found:?}, the model expects {expected:?}")]
    ShapeDiffers {
        /// Tensor name.
        name: String,
        /// The model's shape.
        expected: Vec<usize>,
        /// The checkpoint's shape.
        found: Vec<usize>,
    },
    /// A flat vector has the wrong length for the model.
    #[error("flat parameter vector has {found} values, the model has {expected}")]
    FlatLength {
        /// Parameters in the model.
        expected: usize,
        /// Values given.
        found: usize,
    },
    /// The configuration is not a valid model.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// LibTorch failed while copying values.
    #[error("LibTorch failed while copying parameters: {0}")]
    Torch(#[from] TchError),
}

/// Serializes a flat parameter vector (canonical order) with its config.
pub fn encode(cfg: &ModelConfig, flat: &[f32]) -> Result<Vec<u8>, CheckpointError> {
    encode_with_metadata(cfg, flat, &[])
}

/// [`encode`] with extra metadata entries.
pub(crate) fn encode_with_metadata(
    cfg: &ModelConfig,
    flat: &[f32],
    extra: &[(&str, &str)],
) -> Result<Vec<u8>, CheckpointError> {
    cfg.validate()?;
    let specs = cfg.tensor_specs();
    let expected = specs.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    if flat.len() != expected {
        return Err(CheckpointError::FlatLength {
            expected,
            found: flat.len(),
        });
    }
    let bytes: Vec<u8> = flat.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut views = Vec::with_capacity(specs.len());
    let mut offset = 0;
    for (name, shape) in specs {
        let len = 4 * shape.iter().product::<usize>();
        let view = TensorView::new(Dtype::F32, shape, &bytes[offset..offset + len])
            .map_err(|e| CheckpointError::NotSafetensors(e.to_string()))?;
        views.push((name, view));
        offset += len;
    }
    let config =
        serde_json::to_string(cfg).map_err(|e| CheckpointError::BadConfig(e.to_string()))?;
    let mut metadata = HashMap::from([(CONFIG_KEY.to_owned(), config)]);
    metadata.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    safetensors::serialize(views, Some(metadata))
        .map_err(|e| CheckpointError::NotSafetensors(e.to_string()))
}

/// Parses a checkpoint into its config and flat parameter vector (canonical order), checking that
/// the tensors are exactly those the config describes.
pub fn decode(bytes: &[u8]) -> Result<(ModelConfig, Vec<f32>), CheckpointError> {
    let (_, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| CheckpointError::NotSafetensors(e.to_string()))?;
    let config = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(CONFIG_KEY))
        .ok_or(CheckpointError::MissingConfig)?;
    let cfg: ModelConfig =
        serde_json::from_str(config).map_err(|e| CheckpointError::BadConfig(e.to_string()))?;
    cfg.validate()?;
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| CheckpointError::NotSafetensors(e.to_string()))?;
    let found: BTreeMap<String, TensorView<'_>> = st.tensors().into_iter().collect();
    let specs = cfg.tensor_specs();
    check_names(specs.iter().map(|(n, _)| n), found.keys())?;
    let mut flat = Vec::with_capacity(specs.iter().map(|(_, s)| s.iter().product::<usize>()).sum());
    for (name, shape) in &specs {
        // check_names guarantees that every spec name is present.
        let Some(view) = found.get(name) else {
            continue;
        };
        if view.dtype() != Dtype::F32 {
            return Err(CheckpointError::NotFloat32 {
                name: name.clone(),
                dtype: format!("{:?}", view.dtype()),
            });
        }
        if view.shape() != shape.as_slice() {
            return Err(CheckpointError::ShapeDiffers {
                name: name.clone(),
                expected: shape.clone(),
                found: view.shape().to_vec(),
            });
        }
        flat.extend(
            view.data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
    }
    Ok((cfg, flat))
}

/// Compares the model's tensor names with the checkpoint's.
fn check_names<'a>(
    model: impl Iterator<Item = &'a String>,
    found: impl Iterator<Item = &'a String>,
) -> Result<(), CheckpointError> {
    let found: BTreeSet<&String> = found.collect();
    let wanted: BTreeSet<&String> = model.collect();
    if found == wanted {
        return Ok(());
    }
    Err(CheckpointError::NamesDiffer {
        missing: wanted.difference(&found).map(|s| (*s).clone()).collect(),
        extra: found.difference(&wanted).map(|s| (*s).clone()).collect(),
    })
}

/// A deterministic initial checkpoint: weight matrices drawn from normal(0, [`INIT_STD`]) with
/// ChaCha8 seeded by `seed` in canonical order, norm weights 1.
pub fn init_checkpoint(cfg: &ModelConfig, seed: u64) -> Result<Vec<u8>, CheckpointError> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut flat = Vec::with_capacity(usize::try_from(cfg.parameter_count()).unwrap_or(0));
    for (_, shape) in cfg.tensor_specs() {
        let n: usize = shape.iter().product();
        if shape.len() == 1 {
            flat.extend(std::iter::repeat_n(1.0f32, n));
        } else {
            flat.extend((0..n).map(|_| (INIT_STD * standard_normal(&mut rng)) as f32));
        }
    }
    encode(cfg, &flat)
}

/// Box–Muller transform of two uniforms in (0, 1].
fn standard_normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// The values of `vs` as a checkpoint of `cfg`.
pub fn save(vs: &VarStore, cfg: &ModelConfig) -> Result<Vec<u8>, CheckpointError> {
    check_store(vs, cfg)?;
    encode(cfg, &flat_parameters(vs)?)
}

/// Parses a checkpoint into its config and CPU tensors in canonical order.
pub fn load(bytes: &[u8]) -> Result<(ModelConfig, Vec<(String, Tensor)>), CheckpointError> {
    let (cfg, flat) = decode(bytes)?;
    let mut offset = 0;
    let mut tensors = Vec::new();
    for (name, shape) in cfg.tensor_specs() {
        let n: usize = shape.iter().product();
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        tensors.push((
            name,
            Tensor::f_from_slice(&flat[offset..offset + n])?.f_reshape(dims)?,
        ));
        offset += n;
    }
    Ok((cfg, tensors))
}

/// Loads the values of a checkpoint into `vs`, which must hold exactly the same tensor names and
/// shapes. Returns the checkpoint's config.
pub fn copy_into(vs: &VarStore, bytes: &[u8]) -> Result<ModelConfig, CheckpointError> {
    let (cfg, flat) = decode(bytes)?;
    check_store(vs, &cfg)?;
    let vars = vs.variables();
    let mut offset = 0;
    tch::no_grad(|| -> Result<(), CheckpointError> {
        for (name, shape) in cfg.tensor_specs() {
            let n: usize = shape.iter().product();
            let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
            let src = Tensor::f_from_slice(&flat[offset..offset + n])?.f_reshape(dims)?;
            // check_store guarantees that every spec name is a variable.
            if let Some(var) = vars.get(&name) {
                let mut var = var.shallow_clone();
                var.f_copy_(&src)?;
            }
            offset += n;
        }
        Ok(())
    })?;
    Ok(cfg)
}

/// Checks that the variables of `vs` are exactly the tensors of `cfg`.
fn check_store(vs: &VarStore, cfg: &ModelConfig) -> Result<(), CheckpointError> {
    let vars = vs.variables();
    let specs = cfg.tensor_specs();
    check_names(vars.keys(), specs.iter().map(|(n, _)| n))?;
    for (name, shape) in specs {
        let model: Vec<usize> = vars
            .get(&name)
            .map(|t| t.size().iter().map(|&d| d as usize).collect())
            .unwrap_or_default();
        if model != shape {
            return Err(CheckpointError::ShapeDiffers {
                name,
                expected: model,
                found: shape,
            });
        }
    }
    Ok(())
}

/// All parameters of `vs` in canonical order (names sorted byte-wise, row-major).
pub fn flat_parameters(vs: &VarStore) -> Result<Vec<f32>, CheckpointError> {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    let mut flat = vec![0f32; flat_len(vs)];
    let mut offset = 0;
    for (_, t) in vars {
        let n = t.numel();
        let cpu = t
            .f_to_device(Device::Cpu)?
            .f_to_kind(Kind::Float)?
            .f_contiguous()?;
        cpu.f_copy_data(&mut flat[offset..offset + n], n)?;
        offset += n;
    }
    Ok(flat)
}

/// Number of parameters in `vs`.
pub fn flat_len(vs: &VarStore) -> usize {
    vs.variables().values().map(Tensor::numel).sum()
}
