//! HTTP/1.1 for both sides of the proxy (shard): heads, body framing, canned responses.

pub mod body;
pub mod fields;
pub mod head;
pub mod respond;
pub mod scan;
