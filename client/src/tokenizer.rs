//! Tokenizers.
//!
//! Only the byte-level tokenizer is built in: ids 0..=255 are the UTF-8 bytes of the text, 256 is
//! BOS and 257 is EOS (vocabulary 258). It needs no files, so every site agrees on it offline.
//! A GPT-2 BPE tokenizer is not implemented; presets still take the vocabulary size as a
//! parameter, so their parameter counts can be quoted for the GPT-2 vocabulary (50257).

use std::str::FromStr;

/// Errors raised when choosing a tokenizer.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The tokenizer name is not known.
    #[error("unknown tokenizer {0:?}: the only built-in tokenizer is \"bytes\"")]
    Unknown(String),
}

/// A text ↔ token-id mapping.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tokenizer {
    /// UTF-8 bytes plus BOS (256) and EOS (257).
    Bytes,
}

impl Tokenizer {
    /// Number of distinct token ids.
    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Bytes => 258,
        }
    }

    /// Id that starts a document.
    pub fn bos(&self) -> u32 {
        match self {
            Self::Bytes => 256,
        }
    }

    /// Id that ends a document; the packer puts it between documents.
    pub fn eos(&self) -> u32 {
        match self {
            Self::Bytes => 257,
        }
    }

    /// Token ids of `text` (no BOS/EOS added).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        match self {
            Self::Bytes => text.bytes().map(u32::from).collect(),
        }
    }

    /// Text of `ids`; special and out-of-range ids are skipped and invalid UTF-8 is replaced.
    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Self::Bytes => {
                let bytes: Vec<u8> = ids.iter().filter_map(|&i| u8::try_from(i).ok()).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
        }
    }
}

impl FromStr for Tokenizer {
    type Err = TokenizerError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "bytes" => Ok(Self::Bytes),
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
        assert!("gpt2".parse::<Tokenizer>().is_err());
    }
}
