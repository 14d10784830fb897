//! `.pt` files as `torch.save(state_dict)` writes them, written and read without torch.
//!
//! The layout is torch's zip serialisation (torch >= 1.6): an uncompressed zip whose entries sit
//! under one folder (`<name>/`), each entry's data aligned to 64 bytes as torch aligns them:
//! - `data.pkl`: a protocol-2 pickle of an `OrderedDict` mapping each name to
//!   `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, OrderedDict())`, where
//!   `storage` is the persistent id `('storage', torch.FloatStorage, '<key>', 'cpu', numel)`;
//! - `data/<key>`: that storage's bytes, little-endian;
//! - `.format_version` "1", `.storage_alignment` "64", `byteorder` "little", `version` "3".
//!
//! [`write`] emits what `torch.load`'s default `weights_only=True` unpickler admits
//! (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`, the typed storage classes) and
//! no memo (torch's own writer memoises; readers do not need it). [`read`] runs the same subset
//! of the pickle machine, and refuses any other callable: a state dict of plain tensors is all
//! it takes, and nothing in a file can make it run code.

pub mod read;
pub mod write;

pub use read::{read_state_dict, LoadedTensor};
pub use write::{state_dict_bytes, Tensor};

/// torch's storage alignment within the zip (`torch.serialization._get_storage_alignment`).
const ALIGNMENT: u16 = 64;
