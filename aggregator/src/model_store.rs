//! The global model as the aggregator sees it: named f32 tensors in a safetensors file, handled
//! as one flat vector in the canonical order (tensors sorted by name, each row-major). The
//! aggregator never interprets the architecture; the client's metadata rides along untouched.

use std::collections::HashMap;
use std::io::{self, Write};

use safetensors::{Dtype, SafeTensors};

// Safetensors stores little-endian values, which `to_safetensors` views in memory as they are.
#[cfg(not(target_endian = "little"))]
compile_error!("the aggregator's model store assumes a little-endian machine");

/// Failure to read a model checkpoint.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// The bytes are not a safetensors file.
    #[error("not a safetensors checkpoint: {0}")]
    Malformed(String),
    /// A tensor has a dtype other than f32.
    #[error("tensor '{name}' has dtype {dtype}; Quorum checkpoints hold f32 tensors only")]
    NotF32 {
        /// Tensor name.
        name: String,
        /// Its dtype.
        dtype: String,
    },
    /// A flat vector does not match the model's parameter count.
    #[error("vector has {got} values but the model has {expected} parameters")]
    WrongLength {
        /// Parameters in the model.
        expected: usize,
        /// Values supplied.
        got: usize,
    },
}

/// Shape of one named tensor in the flat vector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSlot {
    /// Tensor name.
    pub name: String,
    /// Tensor shape.
    pub shape: Vec<usize>,
}

/// A model as a flat parameter vector plus the layout needed to write it back.
#[derive(Debug, Clone)]
pub struct FlatModel {
    /// Parameters in canonical order.
    pub values: Vec<f32>,
    /// Layout, in canonical order.
    pub layout: Vec<TensorSlot>,
    /// The checkpoint's metadata (model configuration), carried through unchanged.
    pub metadata: HashMap<String, String>,
}

impl FlatModel {
    /// Parses a safetensors checkpoint of f32 tensors.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, ModelError> {
        let (_, header) =
            SafeTensors::read_metadata(bytes).map_err(|e| ModelError::Malformed(e.to_string()))?;
        let metadata = header.metadata().clone().unwrap_or_default();
        let tensors =
            SafeTensors::deserialize(bytes).map_err(|e| ModelError::Malformed(e.to_string()))?;
        let mut named = tensors.tensors();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let total: usize = named
            .iter()
            .map(|(_, t)| t.shape().iter().product::<usize>())
            .sum();
        let mut values = Vec::with_capacity(total);
        let mut layout = Vec::with_capacity(named.len());
        for (name, view) in named {
            if view.dtype() != Dtype::F32 {
                return Err(ModelError::NotF32 {
                    name,
                    dtype: format!("{:?}", view.dtype()),
                });
            }
            values.extend(
                view.data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
            layout.push(TensorSlot {
                name,
                shape: view.shape().to_vec(),
            });
        }
        Ok(Self {
            values,
            layout,
            metadata,
        })
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// True for a model without parameters.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Replaces the parameters, keeping layout and metadata; `values` must fill the layout
    /// (whatever `self.values` holds, which may have been taken to step on in place).
    pub fn with_values(&self, values: Vec<f32>) -> Result<Self, ModelError> {
        let expected: usize = self
            .layout
            .iter()
            .map(|slot| slot.shape.iter().product::<usize>())
            .sum();
        if values.len() != expected {
            return Err(ModelError::WrongLength {
                expected,
                got: values.len(),
            });
        }
        Ok(Self {
            values,
            layout: self.layout.clone(),
            metadata: self.metadata.clone(),
        })
    }

    /// Writes the model as a safetensors file to `out` (the same names, shapes and metadata as
    /// the file it was read from), streaming the values as their little-endian bytes in place:
    /// no copy of the model is made, however large.
    ///
    /// The layout is safetensors' own: an 8-byte little-endian header length, a JSON header
    /// (each tensor's dtype, shape and byte range; the metadata under `__metadata__`) padded
    /// with spaces to a multiple of 8, then the tensors' bytes in canonical order.
    pub fn write_safetensors(&self, out: &mut dyn Write) -> io::Result<()> {
        let mut rest = self.values.as_slice();
        let tensors = self.layout.iter().map(|slot| {
            let (values, after) =
                rest.split_at(slot.shape.iter().product::<usize>().min(rest.len()));
            rest = after;
            (slot.name.as_str(), slot.shape.as_slice(), values)
        });
        write_f32_safetensors(out, &self.metadata, tensors.collect())
    }
}

/// Writes f32 tensors (name, shape, values; in the order given, which must be sorted by name
/// for a canonical file) as a safetensors file to `out`, streaming each tensor's values as their
/// little-endian bytes in place: nothing is copied, however large.
pub fn write_f32_safetensors(
    out: &mut dyn Write,
    metadata: &HashMap<String, String>,
    tensors: Vec<(&str, &[usize], &[f32])>,
) -> io::Result<()> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::json!(metadata));
    }
    let mut offset = 0;
    for (name, shape, values) in &tensors {
        let end = offset + values.len() * 4;
        header.insert(
            (*name).to_owned(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut header = serde_json::to_vec(&header).map_err(io::Error::other)?;
    header.resize(header.len().next_multiple_of(8), b' ');
    out.write_all(&(header.len() as u64).to_le_bytes())?;
    out.write_all(&header)?;
    for (_, _, values) in &tensors {
        for chunk in values.chunks(1 << 18) {
            out.write_all(bytemuck::cast_slice(chunk))?;
        }
    }
    Ok(())
}

pub use quorum_crypto::digest::sha256;

#[cfg(test)]
mod tests {
    use safetensors::tensor::TensorView;

    use super::*;

    fn serialized(model: &FlatModel) -> Vec<u8> {
        let mut out = Vec::new();
        model.write_safetensors(&mut out).unwrap();
        out
    }

    fn checkpoint() -> Vec<u8> {
        let a: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let b: Vec<u8> = [5.0f32, 6.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let views = vec![
            (
                "z.weight".to_string(),
                TensorView::new(Dtype::F32, vec![2, 2], &a).unwrap(),
            ),
            (
                "a.bias".to_string(),
                TensorView::new(Dtype::F32, vec![2], &b).unwrap(),
            ),
        ];
        let meta = HashMap::from([("quorum.model_config".to_string(), "{}".to_string())]);
        safetensors::serialize(views, Some(meta)).unwrap()
    }

    #[test]
    fn flat_order_is_sorted_by_name_and_round_trips() {
        let model = FlatModel::from_safetensors(&checkpoint()).unwrap();
        assert_eq!(model.values, vec![5.0, 6.0, 1.0, 2.0, 3.0, 4.0]);
        assert_eq!(model.layout[0].name, "a.bias");
        let again = FlatModel::from_safetensors(&serialized(&model)).unwrap();
        assert_eq!(again.values, model.values);
        assert_eq!(again.metadata.get("quorum.model_config").unwrap(), "{}");
    }

    #[test]
    fn wrong_length_and_garbage_are_rejected() {
        let model = FlatModel::from_safetensors(&checkpoint()).unwrap();
        assert!(matches!(
            model.with_values(vec![0.0; 5]),
            Err(ModelError::WrongLength { .. })
        ));
        assert!(FlatModel::from_safetensors(b"not a checkpoint").is_err());
    }
}
