//! Built-in, deterministic, non-IID text corpora, so that training and the demo run offline.
//!
//! Each [`Flavour`] is a small template grammar with its own vocabulary (clinical notes, financial
//! reports, paper abstracts, contract clauses), so sites drawing different flavours see different
//! token distributions. About a third of all sentences come from a grammar shared by every
//! flavour (office life, weather, schedules), which is what federated training can transfer
//! between sites. Documents contain no blank lines and are separated by one blank line, the
//! paragraph rule of `.txt` sources. The text is ASCII and fully determined by (flavour, seed).

use std::str::FromStr;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Errors raised when naming a corpus.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    /// The flavour name is not built in.
    #[error("unknown built-in corpus {0:?}: choose one of clinical, finance, academic, legal")]
    UnknownFlavour(String),
}

/// A built-in text distribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Flavour {
    /// Clinical notes and discharge summaries.
    Clinical,
    /// Ledgers and quarterly reports.
    Finance,
    /// Research abstracts.
    Academic,
    /// Contract clauses.
    Legal,
}

impl Flavour {
    /// Every flavour, in a fixed order.
    pub const ALL: [Flavour; 4] = [Self::Clinical, Self::Finance, Self::Academic, Self::Legal];

    /// The name used in `builtin:<name>` sources.
    pub fn name(self) -> &'static str {
        match self {
            Self::Clinical => "clinical",
            Self::Finance => "finance",
            Self::Academic => "academic",
            Self::Legal => "legal",
        }
    }

    fn grammar(self) -> &'static Grammar {
        match self {
            Self::Clinical => &CLINICAL,
            Self::Finance => &FINANCE,
            Self::Academic => &ACADEMIC,
            Self::Legal => &LEGAL,
        }
    }
}

impl FromStr for Flavour {
    type Err = CorpusError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| CorpusError::UnknownFlavour(s.to_owned()))
    }
}

/// The first `bytes` bytes of the endless document stream of `flavour` under `seed`, documents
/// separated by blank lines.
pub fn builtin_corpus(flavour: Flavour, seed: u64, bytes: usize) -> String {
    let mut out = String::with_capacity(bytes + 512);
    for doc in Documents::new(flavour, seed) {
        if !out.is_empty() {
            out.push_str("\n\n");
        }
        out.push_str(&doc);
        if out.len() >= bytes {
            break;
        }
    }
    // The text is ASCII, so any byte index is a character boundary.
    out.truncate(bytes);
    out
}

/// Endless, deterministic stream of documents of one flavour.
#[derive(Debug, Clone)]
pub struct Documents {
    flavour: Flavour,
    rng: ChaCha8Rng,
}

impl Documents {
    /// Starts the stream for (flavour, seed).
    pub fn new(flavour: Flavour, seed: u64) -> Self {
        // Different flavours under the same seed must not share random choices.
        let salt = flavour
            .name()
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
        Self {
            flavour,
            rng: ChaCha8Rng::seed_from_u64(seed ^ salt),
        }
    }
}

impl Iterator for Documents {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        let g = self.flavour.grammar();
        let rng = &mut self.rng;
        let mut doc = fill(pick(rng, g.headers), g.slots, rng);
        let sentences = rng.random_range(3..=7);
        for i in 0..sentences {
            doc.push(if i % 3 == 2 { '\n' } else { ' ' });
            let sentence = if rng.random_bool(0.3) {
                fill(pick(rng, COMMON.templates), COMMON.slots, rng)
            } else {
                fill(pick(rng, g.templates), g.slots, rng)
            };
            doc.push_str(&sentence);
        }
        Some(doc)
    }
}

struct Grammar {
    headers: &'static [&'static str],
    templates: &'static [&'static str],
    slots: &'static [(&'static str, &'static [&'static str])],
}

fn pick<'a>(rng: &mut ChaCha8Rng, items: &[&'a str]) -> &'a str {
    items[rng.random_range(0..items.len())]
}

/// Replaces each `{slot}` with a random word from the slot's list; `{n}` is a number 1..99 and
/// `{year}` a year. Unknown slots are kept verbatim (a grammar bug shows in the text).
fn fill(template: &str, slots: &[(&str, &[&str])], rng: &mut ChaCha8Rng) -> String {
    let mut out = String::with_capacity(template.len() * 2);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        let key = &rest[open + 1..open + close];
        match key {
            "n" => out.push_str(&rng.random_range(1..100).to_string()),
            "year" => out.push_str(&rng.random_range(1990..2025).to_string()),
            _ => match slots.iter().chain(COMMON.slots).find(|(k, _)| *k == key) {
                Some((_, words)) => out.push_str(pick(rng, words)),
                None => out.push_str(&rest[open..=open + close]),
            },
        }
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    out
}

static COMMON: Grammar = Grammar {
    headers: &[""],
    templates: &[
        "The {day} meeting was moved to {time} because of the {weather}.",
        "Please send the updated {document} to the {team} team before {day}.",
        "{person} said the {weather} made the commute slow this morning.",
        "As discussed on {day}, the {team} team will review the {document}.",
        "Lunch on {day} is at {time} in the {room}.",
        "Remember to lock the {room} when you leave after {time}.",
    ],
    slots: &[
        (
            "day",
            &["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"],
        ),
        ("time", &["9 am", "10 am", "noon", "2 pm", "4 pm"]),
        (
            "weather",
            &["heavy rain", "snow", "fog", "heat", "strong wind"],
        ),
        (
            "document",
            &["schedule", "summary", "checklist", "memo", "report"],
        ),
        (
            "team",
            &["operations", "records", "quality", "facilities", "admin"],
        ),
        (
            "person",
            &["Alex", "Sam", "Jordan", "Taylor", "Morgan", "Casey"],
        ),
        (
            "room",
            &["main office", "conference room", "break room", "archive"],
        ),
    ],
};

static CLINICAL: Grammar = Grammar {
    headers: &[
        "DISCHARGE SUMMARY.",
        "PROGRESS NOTE.",
        "ADMISSION NOTE.",
        "CONSULT NOTE.",
    ],
    templates: &[
        "Patient is a {n}-year-old {sex} admitted with {symptom} and {symptom}.",
        "Vitals: BP {n}0/{n}, HR {n}, temp 3{digit}.{digit} C, SpO2 9{digit}%.",
        "Started on {drug} {n} mg {freq} for suspected {condition}.",
        "Labs notable for elevated {lab}; {lab} within normal limits.",
        "History of {condition} and {condition}; no known drug allergies.",
        "Plan: continue {drug}, repeat {lab} in {n} hours, follow up in clinic.",
        "Exam showed {finding}; patient denies {symptom}.",
    ],
    slots: &[
        ("sex", &["male", "female"]),
        ("digit", &["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"]),
        (
            "symptom",
            &[
                "chest pain",
                "dyspnea",
                "fever",
                "nausea",
                "cough",
                "fatigue",
            ],
        ),
        (
            "drug",
            &[
                "metoprolol",
                "amoxicillin",
                "heparin",
                "furosemide",
                "insulin",
            ],
        ),
        (
            "freq",
            &["daily", "twice daily", "every 8 hours", "as needed"],
        ),
        (
            "condition",
            &[
                "pneumonia",
                "heart failure",
                "diabetes",
                "hypertension",
                "sepsis",
            ],
        ),
        (
            "lab",
            &[
                "troponin",
                "creatinine",
                "lactate",
                "white count",
                "potassium",
            ],
        ),
        (
            "finding",
            &[
                "bibasilar crackles",
                "mild edema",
                "a soft abdomen",
                "clear lungs",
            ],
        ),
    ],
};

static FINANCE: Grammar = Grammar {
    headers: &[
        "QUARTERLY REPORT.",
        "LEDGER ENTRY.",
        "EARNINGS NOTE.",
        "RISK MEMO.",
    ],
    templates: &[
        "Revenue for Q{q} {year} rose {n}.{n}% to ${n}.{n}M, driven by {segment}.",
        "Operating margin was {n}% versus {n}% a year earlier.",
        "DEBIT {account} ${n},{n}00.00; CREDIT {account} ${n},{n}00.00.",
        "The board approved a dividend of ${digit}.{n} per share payable in Q{q}.",
        "Net interest income fell ${n}M as {rate} rates moved {n} bps.",
        "Exposure to {segment} is hedged with {instrument} maturing in {year}.",
        "Cash and equivalents ended the quarter at ${n}.{n}B.",
    ],
    slots: &[
        ("q", &["1", "2", "3", "4"]),
        ("digit", &["0", "1", "2", "3", "4", "5"]),
        (
            "segment",
            &[
                "retail banking",
                "wealth management",
                "commercial loans",
                "payments",
            ],
        ),
        (
            "account",
            &[
                "Accounts Receivable",
                "Cash",
                "Inventory",
                "Accrued Expenses",
            ],
        ),
        ("rate", &["policy", "deposit", "mortgage", "interbank"]),
        (
            "instrument",
            &[
                "interest rate swaps",
                "forward contracts",
                "options",
                "futures",
            ],
        ),
    ],
};

static ACADEMIC: Grammar = Grammar {
    headers: &["Abstract.", "Summary.", "Introduction.", "Background."],
    templates: &[
        "We propose a {adj} method for {task} based on {technique}.",
        "Experiments on {n} benchmarks show that our approach improves {metric} by {n}%.",
        "Prior work on {task} relies on {technique}, which scales poorly.",
        "We prove that the {adj} estimator converges under mild assumptions.",
        "Our analysis reveals a trade-off between {metric} and {metric}.",
        "Code and data are released to support reproducible research on {task}.",
        "In contrast to {technique}, our model requires no labelled data.",
    ],
    slots: &[
        (
            "adj",
            &[
                "scalable",
                "robust",
                "efficient",
                "novel",
                "principled",
                "simple",
            ],
        ),
        (
            "task",
            &[
                "graph matching",
                "protein folding",
                "speech recognition",
                "causal discovery",
            ],
        ),
        (
            "technique",
            &[
                "contrastive learning",
                "variational inference",
                "sparse coding",
            ],
        ),
        (
            "metric",
            &[
                "accuracy",
                "sample efficiency",
                "calibration",
                "latency",
                "recall",
            ],
        ),
    ],
};

static LEGAL: Grammar = Grammar {
    headers: &[
        "AGREEMENT.",
        "WHEREAS CLAUSES.",
        "ARTICLE {n}.",
        "SCHEDULE {n}.",
    ],
    templates: &[
        "WHEREAS the {party} wishes to engage the {party} for the {purpose};",
        "Section {n}.{n}. The {party} shall indemnify the {party} against all {claim}.",
        "This Agreement shall be governed by the laws of {place}.",
        "Notwithstanding Section {n}, the {party} may terminate upon {n} days written notice.",
        "Any {claim} arising hereunder shall be settled by arbitration in {place}.",
        "The {party} represents and warrants that it has full authority to enter this Agreement.",
        "NOW, THEREFORE, in consideration of the mutual covenants herein, the parties agree.",
    ],
    slots: &[
        (
            "party",
            &[
                "Licensor",
                "Licensee",
                "Company",
                "Contractor",
                "Tenant",
                "Landlord",
            ],
        ),
        (
            "purpose",
            &[
                "provision of services",
                "lease of premises",
                "licence of software",
            ],
        ),
        (
            "claim",
            &["claims", "losses", "damages", "liabilities", "disputes"],
        ),
        (
            "place",
            &[
                "the State of New York",
                "England and Wales",
                "Delaware",
                "Ontario",
            ],
        ),
    ],
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_replaces_known_slots_only() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let s = fill("{sex} {unknown} {n}", CLINICAL.slots, &mut rng);
        assert!(s.starts_with("male ") || s.starts_with("female "), "{s}");
        assert!(s.contains("{unknown}"));
        assert!(!s.contains("{n}"));
    }

    #[test]
    fn every_template_slot_is_defined() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        for f in Flavour::ALL {
            let g = f.grammar();
            for t in g.templates.iter().chain(g.headers).chain(COMMON.templates) {
                let s = fill(t, g.slots, &mut rng);
                assert!(!s.contains('{'), "{f:?}: {s}");
            }
        }
    }

    #[test]
    fn corpus_has_exact_length_and_blank_line_separators() {
        let text = builtin_corpus(Flavour::Legal, 3, 5000);
        assert_eq!(text.len(), 5000);
        assert!(text.is_ascii());
        assert!(text.split("\n\n").count() > 5);
        assert!(text.split("\n\n").all(|d| !d.trim().is_empty()));
    }
}
