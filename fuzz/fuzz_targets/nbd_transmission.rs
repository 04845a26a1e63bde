//! Fuzz target: a valid negotiation (the first byte picks simple, structured, extended headers
//! or EXPORT_NAME), then arbitrary bytes as transmission-phase requests and payloads.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    diskstream_nbd::fuzzing::transmission(data);
});
