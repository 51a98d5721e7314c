//! `Record::from_canonical` on arbitrary bytes.
//!
//! Properties: it never panics; an accepted record re-encodes to exactly the bytes it was read
//! from, parses again to an equal record, and its hash is that of those bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use quorum_audit::{Record, chain_hash};

fuzz_target!(|data: &[u8]| {
    let Ok(record) = Record::from_canonical(data) else {
        return;
    };
    let bytes = record.canonical_bytes();
    assert_eq!(
        bytes, data,
        "canonical bytes differ from the accepted input"
    );
    let again = Record::from_canonical(&bytes).expect("canonical bytes parse");
    assert_eq!(again, record, "re-parsing changed the record");
    assert_eq!(record.hash(), chain_hash(&record.prev_hash, data));
});
