//! Training data: document sources and the packed, shuffled block stream.
//!
//! A [`TextSource`] yields documents one at a time, never holding the corpus in memory:
//! - `.txt` (also `.text`, `.md`): one document per blank-line-separated paragraph;
//! - `.jsonl` (also `.ndjson`): one JSON object per line with a string field `"text"`;
//! - either of those compressed as `.gz`;
//! - a directory: every supported file below it, in byte-wise path order;
//! - `builtin:<flavour>[:<seed>]`: the generated corpora of [`crate::corpus`].
//!
//! A [`BlockStream`] tokenizes documents, appends EOS after each, and cuts the token stream into
//! blocks of `seq_len + 1` tokens (inputs and shifted targets), shuffled through a bounded buffer
//! whose RNG is reseeded from (seed, epoch), over endless epochs. One document in
//! [`VALIDATION_EVERY`] (chosen by a hash of its text, so the choice is stable across epochs and
//! machines) is held out for validation and never trained on.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::Tensor;

use crate::corpus::{CorpusError, Documents, Flavour};
use crate::tokenizer::Tokenizer;

/// One document in this many is a validation document.
pub const VALIDATION_EVERY: u64 = 20;

/// Bytes per epoch of a `builtin:` source.
pub const BUILTIN_EPOCH_BYTES: usize = 4 << 20;

/// Default capacity of the shuffle buffer, in blocks.
pub const DEFAULT_SHUFFLE_BLOCKS: usize = 1024;

/// Errors raised while reading training data.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or directory could not be read.
    #[error("cannot read {path}: {source}")]
    Unreadable {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A `.jsonl` line is not an object with a string `"text"` field.
    #[error("{path} line {line}: expected a JSON object with a string \"text\" field ({detail})")]
    BadJsonLine {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The parser's message.
        detail: String,
    },
    /// The file extension is not one of the supported formats.
    #[error(
        "{0}: unsupported data file; only .txt, .md and .jsonl (each optionally .gz) are read: \
         convert it, or move it out of the data folder"
    )]
    UnsupportedFile(PathBuf),
    /// The `builtin:` source is malformed.
    #[error("bad built-in source {spec:?}: {reason}")]
    BadBuiltin {
        /// The source string.
        spec: String,
        /// What is wrong.
        reason: String,
    },
    /// The flavour of a `builtin:` source is unknown.
    #[error(transparent)]
    Corpus(#[from] CorpusError),
    /// A pass over the source produced no training block.
    #[error("{0} holds too little training text for one block; add data or shorten seq_len")]
    NoTrainingBlocks(String),
    /// A pass over the source produced no validation block.
    #[error("{0} holds too little text for a validation split; add data or shorten seq_len")]
    NoValidationBlocks(String),
}

/// Boxed iterator of documents from one pass over a source.
pub type DocIter = Box<dyn Iterator<Item = Result<String, DataError>> + Send>;

#[derive(Debug, Clone)]
enum SourceKind {
    Files(Vec<PathBuf>),
    Builtin {
        flavour: Flavour,
        seed: u64,
        bytes: usize,
    },
}

/// Where a site's documents come from.
#[derive(Debug, Clone)]
pub struct TextSource {
    kind: SourceKind,
    label: String,
}

impl TextSource {
    /// Parses a source: `builtin:<flavour>[:<seed>]`, a supported file, or a directory.
    pub fn open(spec: &str) -> Result<Self, DataError> {
        if let Some(rest) = spec.strip_prefix("builtin:") {
            let (name, seed) = match rest.split_once(':') {
                Some((name, seed)) => {
                    let seed = seed.parse().map_err(|_| DataError::BadBuiltin {
                        spec: spec.to_owned(),
                        reason: "the seed must be an unsigned integer".to_owned(),
                    })?;
                    (name, seed)
                }
                None => (rest, 0),
            };
            return Ok(Self::builtin(name.parse()?, seed, BUILTIN_EPOCH_BYTES));
        }
        let path = PathBuf::from(spec);
        let unreadable = |source| DataError::Unreadable {
            path: path.clone(),
            source,
        };
        let files = if path.metadata().map_err(unreadable)?.is_dir() {
            let mut files = Vec::new();
            collect_files(&path, &mut files)?;
            files.sort_by(|a, b| {
                a.as_os_str()
                    .as_encoded_bytes()
                    .cmp(b.as_os_str().as_encoded_bytes())
            });
            files
        } else {
            format_of(&path)?;
            vec![path]
        };
        Ok(Self {
            kind: SourceKind::Files(files),
            label: spec.to_owned(),
        })
    }

    /// A built-in corpus whose epoch is the first `bytes` bytes of its document stream.
    pub fn builtin(flavour: Flavour, seed: u64, bytes: usize) -> Self {
        Self {
            kind: SourceKind::Builtin {
                flavour,
                seed,
                bytes,
            },
            label: format!("builtin:{}:{seed}", flavour.name()),
        }
    }

    /// The source as given, for messages.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// A fresh pass over all documents, in source order.
    pub fn documents(&self) -> DocIter {
        match &self.kind {
            SourceKind::Builtin {
                flavour,
                seed,
                bytes,
            } => {
                let limit = *bytes;
                let mut used = 0usize;
                Box::new(Documents::new(*flavour, *seed).map_while(move |doc| {
                    (used < limit).then(|| {
                        used += doc.len() + 2;
                        Ok(doc)
                    })
                }))
            }
            SourceKind::Files(files) => Box::new(FileDocs {
                files: files.iter().cloned().collect(),
                current: None,
            }),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Text,
    Jsonl,
}

/// (format, gzip?) from the file name.
fn format_of(path: &Path) -> Result<(Format, bool), DataError> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let (stem, gz) = match name.strip_suffix(".gz") {
        Some(stem) => (stem, true),
        None => (name.as_str(), false),
    };
    let format = match stem.rsplit_once('.').map(|(_, ext)| ext) {
        Some("txt" | "text" | "md") => Format::Text,
        Some("jsonl" | "ndjson") => Format::Jsonl,
        _ => return Err(DataError::UnsupportedFile(path.to_owned())),
    };
    Ok((format, gz))
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    let unreadable = |source| DataError::Unreadable {
        path: dir.to_owned(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(unreadable)? {
        let path = entry.map_err(unreadable)?.path();
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        if path.is_dir() {
            collect_files(&path, out)?;
        } else {
            // A file skipped in silence would shrink the data without anyone noticing.
            format_of(&path)?;
            out.push(path);
        }
    }
    Ok(())
}

/// Documents of a list of files, opening each only when the previous one is exhausted.
struct FileDocs {
    files: VecDeque<PathBuf>,
    current: Option<DocIter>,
}

impl Iterator for FileDocs {
    type Item = Result<String, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(doc) = self.current.as_mut().and_then(Iterator::next) {
                return Some(doc);
            }
            let path = self.files.pop_front()?;
            match open_file(&path) {
                Ok(docs) => self.current = Some(docs),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

fn open_file(path: &Path) -> Result<DocIter, DataError> {
    let (format, gz) = format_of(path)?;
    let file = File::open(path).map_err(|source| DataError::Unreadable {
        path: path.to_owned(),
        source,
    })?;
    let raw: Box<dyn Read + Send> = if gz {
        Box::new(MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let lines = BufReader::new(raw).lines();
    let path = path.to_owned();
    Ok(match format {
        Format::Text => Box::new(Paragraphs {
            lines,
            path,
            done: false,
        }),
        Format::Jsonl => Box::new(lines.enumerate().filter_map(move |(i, line)| {
            let line = match line {
                Ok(line) => line,
                Err(source) => {
                    return Some(Err(DataError::Unreadable {
                        path: path.clone(),
                        source,
                    }));
                }
            };
            if line.trim().is_empty() {
                return None;
            }
            Some(
                serde_json::from_str::<JsonDoc>(&line)
                    .map(|d| d.text)
                    .map_err(|e| DataError::BadJsonLine {
                        path: path.clone(),
                        line: i + 1,
                        detail: e.to_string(),
                    }),
            )
        })),
    })
}

#[derive(serde::Deserialize)]
struct JsonDoc {
    text: String,
}

/// Blank-line-separated paragraphs of a line reader.
struct Paragraphs<L> {
    lines: L,
    path: PathBuf,
    done: bool,
}

impl<L: Iterator<Item = std::io::Result<String>>> Iterator for Paragraphs<L> {
    type Item = Result<String, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut para = String::new();
        while !self.done {
            match self.lines.next() {
                None => self.done = true,
                Some(Err(source)) => {
                    self.done = true;
                    return Some(Err(DataError::Unreadable {
                        path: self.path.clone(),
                        source,
                    }));
                }
                Some(Ok(line)) if line.trim().is_empty() => {
                    if !para.is_empty() {
                        return Some(Ok(para));
                    }
                }
                Some(Ok(line)) => {
                    if !para.is_empty() {
                        para.push('\n');
                    }
                    para.push_str(&line);
                }
            }
        }
        (!para.is_empty()).then_some(Ok(para))
    }
}

/// Whether a document belongs to the validation split (FNV-1a hash of its text).
pub fn is_validation(doc: &str) -> bool {
    let h = doc.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    h % VALIDATION_EVERY == 0
}

/// Packed, shuffled training blocks of one source, over endless epochs.
pub struct BlockStream {
    source: TextSource,
    tokenizer: Tokenizer,
    block_len: usize,
    seed: u64,
    capacity: usize,
    epoch: u64,
    docs: Option<DocIter>,
    pending: Vec<i64>,
    buffer: Vec<Vec<i64>>,
    rng: ChaCha8Rng,
    produced_in_epoch: u64,
    produced: u64,
    started: bool,
}

impl std::fmt::Debug for BlockStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockStream")
            .field("source", &self.source.label)
            .field("block_len", &self.block_len)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl BlockStream {
    /// A stream of `seq_len + 1`-token blocks from `source`, shuffled under `seed`.
    pub fn new(source: TextSource, tokenizer: Tokenizer, seq_len: usize, seed: u64) -> Self {
        Self {
            source,
            tokenizer,
            block_len: seq_len.max(1) + 1,
            seed,
            capacity: DEFAULT_SHUFFLE_BLOCKS,
            epoch: 0,
            docs: None,
            pending: Vec::new(),
            buffer: Vec::new(),
            rng: epoch_rng(seed, 0),
            produced_in_epoch: 0,
            produced: 0,
            started: false,
        }
    }

    /// Sets the shuffle buffer capacity in blocks (at least 1; 1 means no shuffling).
    pub fn with_shuffle_buffer(mut self, blocks: usize) -> Self {
        self.capacity = blocks.max(1);
        self
    }

    /// Tokens per block (`seq_len + 1`).
    pub fn block_len(&self) -> usize {
        self.block_len
    }

    /// Number of completed passes over the source.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The source this stream reads.
    pub fn source(&self) -> &TextSource {
        &self.source
    }

    /// Training blocks drawn since the stream was created (or last rewound).
    pub fn position(&self) -> u64 {
        self.produced
    }

    /// Restarts the stream and draws up to `position`, so the next block is the one that
    /// followed `position` blocks the first time. The order depends only on the seed and the
    /// source, so this is exact; it costs re-reading `position` blocks.
    pub fn rewind(&mut self, position: u64) -> Result<(), DataError> {
        self.epoch = 0;
        self.docs = None;
        self.pending.clear();
        self.buffer.clear();
        self.rng = epoch_rng(self.seed, 0);
        self.produced_in_epoch = 0;
        self.produced = 0;
        self.started = false;
        for _ in 0..position {
            self.next_block()?;
        }
        Ok(())
    }

    /// The next training block.
    pub fn next_block(&mut self) -> Result<Vec<i64>, DataError> {
        loop {
            let exhausted = self.docs.is_none();
            if self.buffer.len() >= self.capacity || (exhausted && !self.buffer.is_empty()) {
                // Draw among the oldest `capacity` blocks, so capacity 1 keeps source order.
                let i = self
                    .rng
                    .random_range(0..self.buffer.len().min(self.capacity));
                self.produced_in_epoch += 1;
                self.produced += 1;
                return Ok(self.buffer.remove(i));
            }
            if exhausted {
                self.start_epoch()?;
                continue;
            }
            match self.docs.as_mut().and_then(Iterator::next) {
                None => self.docs = None,
                Some(doc) => {
                    let doc = doc?;
                    if !is_validation(&doc) {
                        self.push_document(&doc);
                    }
                }
            }
        }
    }

    /// `batch` training blocks as an int64 tensor `[batch, seq_len + 1]` on the CPU.
    pub fn next_batch(&mut self, batch: usize) -> Result<Tensor, DataError> {
        let mut flat = Vec::with_capacity(batch * self.block_len);
        for _ in 0..batch {
            flat.extend(self.next_block()?);
        }
        // Every block has exactly block_len tokens, so the reshape cannot fail.
        Ok(Tensor::from_slice(&flat).reshape([batch as i64, self.block_len as i64]))
    }

    /// Up to `max_blocks` validation blocks, packed from the held-out documents in source order
    /// (no shuffling, so every call returns the same blocks).
    pub fn validation_blocks(&self, max_blocks: usize) -> Result<Vec<Vec<i64>>, DataError> {
        let blocks = self.packed_blocks(true, max_blocks)?;
        if blocks.is_empty() && max_blocks > 0 {
            return Err(DataError::NoValidationBlocks(self.source.label.clone()));
        }
        Ok(blocks)
    }

    /// Every training block of one pass over the source, packed in source order: the records
    /// that DP-SGD samples from (each is one unit of record-level privacy).
    pub fn training_blocks(&self) -> Result<Vec<Vec<i64>>, DataError> {
        let blocks = self.packed_blocks(false, usize::MAX)?;
        if blocks.is_empty() {
            return Err(DataError::NoTrainingBlocks(self.source.label.clone()));
        }
        Ok(blocks)
    }

    /// Up to `max_blocks` blocks packed from the validation documents, or from the training
    /// ones, in source order.
    fn packed_blocks(
        &self,
        validation: bool,
        max_blocks: usize,
    ) -> Result<Vec<Vec<i64>>, DataError> {
        let mut blocks = Vec::new();
        let mut pending = Vec::new();
        for doc in self.source.documents() {
            if blocks.len() >= max_blocks {
                break;
            }
            let doc = doc?;
            if is_validation(&doc) == validation {
                pack(
                    &self.tokenizer,
                    &doc,
                    self.block_len,
                    &mut pending,
                    &mut blocks,
                );
            }
        }
        blocks.truncate(max_blocks);
        Ok(blocks)
    }

    fn start_epoch(&mut self) -> Result<(), DataError> {
        if self.started {
            if self.produced_in_epoch == 0 {
                return Err(DataError::NoTrainingBlocks(self.source.label.clone()));
            }
            self.epoch += 1;
        }
        self.started = true;
        self.rng = epoch_rng(self.seed, self.epoch);
        // Leftover tokens of the last epoch are dropped so every epoch packs identically.
        self.pending.clear();
        self.produced_in_epoch = 0;
        self.docs = Some(self.source.documents());
        Ok(())
    }

    fn push_document(&mut self, doc: &str) {
        pack(
            &self.tokenizer,
            doc,
            self.block_len,
            &mut self.pending,
            &mut self.buffer,
        );
    }
}

fn epoch_rng(seed: u64, epoch: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&epoch.to_le_bytes());
    ChaCha8Rng::from_seed(key)
}

/// Appends `doc`'s tokens and EOS to `pending`, moving every full block into `out`.
fn pack(
    tokenizer: &Tokenizer,
    doc: &str,
    block_len: usize,
    pending: &mut Vec<i64>,
    out: &mut Vec<Vec<i64>>,
) {
    pending.extend(tokenizer.encode(doc).into_iter().map(i64::from));
    pending.push(i64::from(tokenizer.eos()));
    let full = pending.len() / block_len * block_len;
    out.extend(
        pending
            .drain(..full)
            .collect::<Vec<_>>()
            .chunks_exact(block_len)
            .map(<[i64]>::to_vec),
    );
}
