//! Filter nodes: nodes that sit on top of another node (their `file`) and change how requests
//! reach it without storing anything themselves.
//!
//! A filter is transparent to the chain-wide mapping: its [`crate::node::BlockNode::backing`]
//! is the filtered node's backing and its block status is the filtered node's, so `map`, NBD
//! block status and allocation depth through a filter equal those of the node below (QEMU skips
//! filters the same way).

pub mod cor;
