//! Exported folders load in Hugging Face transformers as `LlamaForCausalLM` and give the same
//! logits as the tch model (max abs difference ≤ 1e-4), for tied and untied LM heads.
//!
//! Needs the repository's `.venv` (which provides LibTorch); installs `transformers` into it with
//! pip when missing, and fails with the reason when that is impossible.

use std::path::{Path, PathBuf};
use std::process::Command;

use quorum_client::checkpoint;
use quorum_client::hf::export_hf;
use quorum_client::model::{Llama, ModelConfig};
use tch::{Device, Kind, Tensor, nn};

const SCRIPT: &str = r#"
import json, sys
import torch
from transformers import LlamaForCausalLM
tokens = torch.tensor(json.load(open(sys.argv[1])), dtype=torch.long)
out = {}
for folder in sys.argv[3:]:
    model = LlamaForCausalLM.from_pretrained(folder).float().eval()
    with torch.no_grad():
        out[folder] = model(input_ids=tokens).logits.reshape(-1).tolist()
json.dump(out, open(sys.argv[2], "w"))
"#;

fn venv_python() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = root.join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} not found: run `make venv` first",
        python.display()
    );
    python
}

fn ensure_transformers(python: &Path) {
    let ok = |args: &[&str]| {
        Command::new(python)
            .args(args)
            .status()
            .is_ok_and(|s| s.success())
    };
    if ok(&["-c", "import transformers"]) {
        return;
    }
    let installed = ok(&["-m", "pip", "install", "-q", "transformers", "numpy"]);
    assert!(
        installed && ok(&["-c", "import transformers"]),
        "Hugging Face transformers is not importable from {} and `pip install transformers` \
         failed (offline?). Install it into the .venv by hand to run this parity test.",
        python.display()
    );
}

/// A model with random weights everywhere, norms included, and its checkpoint bytes.
fn random_model(cfg: &ModelConfig, seed: u64) -> (Llama, Vec<u8>) {
    let vs = nn::VarStore::new(Device::Cpu);
    let model = Llama::new(&vs.root(), cfg).unwrap();
    checkpoint::copy_into(&vs, &checkpoint::init_checkpoint(cfg, seed).unwrap()).unwrap();
    tch::manual_seed(seed as i64);
    tch::no_grad(|| {
        for (_, mut t) in vs.variables() {
            if t.dim() == 1 {
                t.copy_(&(Tensor::randn_like(&t) * 0.2 + 1.0));
            }
        }
    });
    let bytes = checkpoint::save(&vs, cfg).unwrap();
    (model, bytes)
}

#[test]
fn transformers_logits_match_tch() {
    tch::set_num_threads(2);
    let python = venv_python();
    ensure_transformers(&python);
    let dir = tempfile::tempdir().unwrap();
    let tokens: Vec<Vec<i64>> = (0..2)
        .map(|r| (0..40).map(|i| (i * 37 + r * 11 + 5) % 258).collect())
        .collect();
    let flat: Vec<i64> = tokens.iter().flatten().copied().collect();
    let input = Tensor::from_slice(&flat).view([2, 40]);

    let tied = ModelConfig::preset("tiny", 258).unwrap();
    let untied = ModelConfig {
        tie_embeddings: false,
        ..tied.clone()
    };
    let mut expected = Vec::new();
    let mut folders = Vec::new();
    for (i, cfg) in [tied, untied].iter().enumerate() {
        let (model, bytes) = random_model(cfg, 40 + i as u64);
        let folder = dir.path().join(format!("hf{i}"));
        export_hf(&bytes, &folder).unwrap();
        let logits = model
            .forward(&input)
            .unwrap()
            .to_kind(Kind::Float)
            .reshape([-1]);
        expected.push(Vec::<f32>::try_from(logits).unwrap());
        folders.push(folder.to_str().unwrap().to_owned());
    }

    let tokens_path = dir.path().join("tokens.json");
    let out_path = dir.path().join("logits.json");
    std::fs::write(&tokens_path, serde_json::to_vec(&tokens).unwrap()).unwrap();
    let script = dir.path().join("hf_logits.py");
    std::fs::write(&script, SCRIPT).unwrap();
    let output = Command::new(&python)
        .arg(&script)
        .arg(&tokens_path)
        .arg(&out_path)
        .args(&folders)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "transformers failed to load the export:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let got: std::collections::HashMap<String, Vec<f32>> =
        serde_json::from_slice(&std::fs::read(&out_path).unwrap()).unwrap();
    for (folder, want) in folders.iter().zip(&expected) {
        let have = &got[folder];
        assert_eq!(have.len(), want.len());
        let max = have
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!("{folder}: max |logit difference| = {max:e}");
        assert!(
            max <= 1e-4,
            "{folder}: transformers logits differ by up to {max}"
        );
        assert!(
            want.iter().any(|v| v.abs() > 0.05),
            "logits suspiciously small"
        );
    }
}
