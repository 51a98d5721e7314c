//! Properties of the flat model view over random safetensors layouts.

use std::collections::HashMap;

use proptest::prelude::*;
use quorum_aggregator::model_store::{FlatModel, ModelError};
use safetensors::{Dtype, tensor::TensorView};

/// Named tensors with shapes of rank 0 to 3 (zero-sized dimensions included) and their values.
fn tensors() -> impl Strategy<Value = Vec<(String, Vec<usize>, Vec<f32>)>> {
    let shapes = prop::collection::vec(0usize..5, 0..4);
    prop::collection::btree_map("[a-z][a-z0-9_.]{0,10}", shapes, 1..6).prop_flat_map(|named| {
        named
            .into_iter()
            .map(|(name, shape)| {
                let len = shape.iter().product::<usize>();
                // Any bit pattern, NaNs included: the store must carry values, not interpret them.
                prop::collection::vec(any::<u32>().prop_map(f32::from_bits), len)
                    .prop_map(move |values| (name.clone(), shape.clone(), values))
            })
            .collect::<Vec<_>>()
    })
}

fn metadata() -> impl Strategy<Value = HashMap<String, String>> {
    prop::collection::hash_map("[a-z.]{1,12}", "[ -~]{0,20}", 0..3)
}

/// A safetensors file holding `tensors` (in the given order) and `metadata`.
fn checkpoint(
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    metadata: &HashMap<String, String>,
) -> Vec<u8> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            let view = TensorView::new(Dtype::F32, shape.clone(), b).expect("length matches shape");
            (name.clone(), view)
        })
        .collect();
    let metadata = (!metadata.is_empty()).then(|| metadata.clone());
    safetensors::serialize(views, metadata).expect("f32 tensors serialize")
}

/// The model as the aggregator writes it.
fn serialized(model: &FlatModel) -> Vec<u8> {
    let mut out = Vec::new();
    model.write_safetensors(&mut out).unwrap();
    out
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

proptest! {
    /// Parsing flattens the tensors in name order; writing back and parsing again gives the same
    /// values (bit for bit), layout and metadata.
    #[test]
    fn safetensors_round_trip(tensors in tensors(), metadata in metadata()) {
        let model = FlatModel::from_safetensors(&checkpoint(&tensors, &metadata)).unwrap();
        // The strategy's map yields names in sorted order: the canonical order.
        let want: Vec<f32> = tensors.iter().flat_map(|(_, _, v)| v.iter().copied()).collect();
        prop_assert_eq!(bits(&model.values), bits(&want));
        let layout: Vec<(&str, &[usize])> =
            model.layout.iter().map(|s| (s.name.as_str(), s.shape.as_slice())).collect();
        let want_layout: Vec<(&str, &[usize])> =
            tensors.iter().map(|(n, s, _)| (n.as_str(), s.as_slice())).collect();
        prop_assert_eq!(layout, want_layout);
        prop_assert_eq!(&model.metadata, &metadata);

        let again = FlatModel::from_safetensors(&serialized(&model)).unwrap();
        prop_assert_eq!(bits(&again.values), bits(&model.values));
        prop_assert_eq!(&again.layout, &model.layout);
        prop_assert_eq!(&again.metadata, &model.metadata);
    }

    /// The file order of the tensors does not matter: the flat order is by name.
    #[test]
    fn flat_order_ignores_file_order(tensors in tensors()) {
        let mut reversed = tensors.clone();
        reversed.reverse();
        let a = FlatModel::from_safetensors(&checkpoint(&tensors, &HashMap::new())).unwrap();
        let b = FlatModel::from_safetensors(&checkpoint(&reversed, &HashMap::new())).unwrap();
        prop_assert_eq!(bits(&a.values), bits(&b.values));
        prop_assert_eq!(&a.layout, &b.layout);
    }

    /// New values of the right length are written into the same layout; any other length is
    /// refused with both lengths named.
    #[test]
    fn with_values_checks_the_length(
        tensors in tensors(),
        fill in any::<f32>(),
        other_len in 0usize..200,
    ) {
        let model = FlatModel::from_safetensors(&checkpoint(&tensors, &HashMap::new())).unwrap();
        let replaced = model.with_values(vec![fill; model.len()]).unwrap();
        let written = FlatModel::from_safetensors(&serialized(&replaced)).unwrap();
        prop_assert_eq!(bits(&written.values), vec![fill.to_bits(); model.len()]);
        prop_assert_eq!(&written.layout, &model.layout);
        if other_len != model.len() {
            let refused = model.with_values(vec![fill; other_len]);
            let is_wrong_length = matches!(
                refused,
                Err(ModelError::WrongLength { expected, got })
                    if expected == model.len() && got == other_len
            );
            prop_assert!(is_wrong_length, "length {other_len} accepted for {}", model.len());
        }
    }
}
