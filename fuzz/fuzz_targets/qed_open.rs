//! Fuzz target: arbitrary bytes opened as a QED image (checked and repaired when dirty), then
//! mapped, read and written.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    diskstream_block::fuzzing::qed_image(data);
});
