//! Consistency check and repair of qcow2 images (like `qemu-img check`). Placeholder: being written.
