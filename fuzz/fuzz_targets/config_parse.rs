//! `federation_from_str` and `site_from_str` on arbitrary UTF-8.
//!
//! Property: neither panics, whatever the text (both parse and validate in memory; neither
//! touches the file system).

#![no_main]

use libfuzzer_sys::fuzz_target;
use quorum_policies::{federation_from_str, site_from_str};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = federation_from_str(text, "fuzz/federation.toml");
    let _ = site_from_str(text, "fuzz/site.toml");
});
