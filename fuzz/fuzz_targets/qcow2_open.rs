//! Fuzz target: arbitrary bytes opened as a qcow2 image, then mapped, read and written.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    diskstream_block::fuzzing::qcow2_image(data);
});
