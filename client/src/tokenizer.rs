//! Tokenizers. Both work offline, so every site agrees on them without downloads.
//!
//! - `bytes`: ids 0..=255 are the UTF-8 bytes of the text, 256 is BOS and 257 is EOS
//!   (vocabulary 258). The default for the built-in corpora and the tests.
//! - `gpt2`: GPT-2's byte-level BPE (`r50k_base`, vocabulary 50257), whose merge table ships
//!   inside the `tiktoken-rs` crate; `<|endoftext|>` (50256) is both BOS and EOS, as in GPT-2.
//!
//! A checkpoint's vocabulary size selects the tokenizer ([`Tokenizer::for_vocab`]).

use std::str::FromStr;

/// Errors raised when choosing a tokenizer.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The tokenizer name is not known.
    #[error("unknown tokenizer {0:?}: the built-in tokenizers are \"bytes\" and \"gpt2\"")]
    Unknown(String),
    /// No built-in tokenizer has this vocabulary size.
    #[error("no built-in tokenizer has a vocabulary of {0} (bytes: 258, gpt2: 50257)")]
    UnknownVocabulary(usize),
}

/// A text ↔ token-id mapping.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tokenizer {
    /// UTF-8 bytes plus BOS (256) and EOS (257).
    Bytes,
    /// GPT-2 byte-level BPE (r50k_base).
    Gpt2,
}

const GPT2_VOCAB: usize = 50257;
const GPT2_END_OF_TEXT: u32 = 50256;

impl Tokenizer {
    /// The tokenizer whose vocabulary has `vocab_size` ids.
    pub fn for_vocab(vocab_size: usize) -> Result<Self, TokenizerError> {
        match vocab_size {
            258 => Ok(Self::Bytes),
            GPT2_VOCAB => Ok(Self::Gpt2),
            other => Err(TokenizerError::UnknownVocabulary(other)),
        }
    }

    /// Number of distinct token ids.
    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Bytes => 258,
            Self::Gpt2 => GPT2_VOCAB,
        }
    }

    /// Id that starts a document.
    pub fn bos(&self) -> u32 {
        match self {
            Self::Bytes => 256,
            Self::Gpt2 => GPT2_END_OF_TEXT,
        }
    }

    /// Id that ends a document; the packer puts it between documents.
    pub fn eos(&self) -> u32 {
        match self {
            Self::Bytes => 257,
            Self::Gpt2 => GPT2_END_OF_TEXT,
        }
    }

    /// Token ids of `text` (no BOS/EOS added; special-token text is encoded as ordinary text).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        match self {
            Self::Bytes => text.bytes().map(u32::from).collect(),
            Self::Gpt2 => tiktoken_rs::r50k_base_singleton().encode_ordinary(text),
        }
    }

    /// Text of `ids`; special and out-of-range ids are skipped and invalid UTF-8 is replaced.
    pub fn decode(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = match self {
            Self::Bytes => ids.iter().filter_map(|&i| u8::try_from(i).ok()).collect(),
            Self::Gpt2 => {
                // Every id below <|endoftext|> is an ordinary token of r50k_base, so the
                // per-token lookup below cannot miss.
                let ordinary: Vec<u32> = ids
                    .iter()
                    .copied()
                    .filter(|&i| i < GPT2_END_OF_TEXT)
                    .collect();
                tiktoken_rs::r50k_base_singleton()
                    ._decode_native_and_split(ordinary)
                    .flatten()
                    .collect()
            }
        };
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl FromStr for Tokenizer {
    type Err = TokenizerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "bytes" => Ok(Self::Bytes),
            "gpt2" => Ok(Self::Gpt2),
            other => Err(TokenizerError::Unknown(other.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_and_skip_specials() {
        let t: Tokenizer = "bytes".parse().unwrap();
        let ids = t.encode("héllo");
        assert_eq!(ids.len(), 6);
        assert_eq!(t.decode(&ids), "héllo");
        let mut with_specials = vec![t.bos()];
        with_specials.extend(&ids);
        with_specials.push(t.eos());
        assert_eq!(t.decode(&with_specials), "héllo");
        assert!("llama".parse::<Tokenizer>().is_err());
    }

    #[test]
    fn gpt2_matches_known_ids_and_round_trips() {
        let t: Tokenizer = "gpt2".parse().unwrap();
        // GPT-2's ids for "Hello world" (as produced by the reference tokenizer).
        assert_eq!(t.encode("Hello world"), vec![15496, 995]);
        let text = "Federated pre-training, über alles: 42 tokens?";
        let mut ids = t.encode(text);
        ids.push(t.eos());
        assert_eq!(t.decode(&ids), text);
        assert_eq!(Tokenizer::for_vocab(50257).unwrap(), Tokenizer::Gpt2);
        assert!(Tokenizer::for_vocab(1000).is_err());
    }
}
