//! meshflow's gRPC contracts: messages, client and server stubs for every `meshflow.<domain>.v1`
//! package, with proto3 JSON (serde) impls, and the encoded descriptor set served by reflection.

pub use pbjson_types;

pub mod codec;

/// Encoded `FileDescriptorSet` of every meshflow proto file (for tonic-reflection).
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));

/// The generated messages and stubs.
#[allow(clippy::all, clippy::unwrap_used, missing_docs)]
pub mod meshflow {
    pub mod workflow {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/meshflow.workflow.v1.rs"));
            include!(concat!(env!("OUT_DIR"), "/meshflow.workflow.v1.serde.rs"));
        }
    }
    pub mod execution {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/meshflow.execution.v1.rs"));
            include!(concat!(env!("OUT_DIR"), "/meshflow.execution.v1.serde.rs"));
        }
    }
    pub mod orchestrator {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/meshflow.orchestrator.v1.rs"));
            include!(concat!(
                env!("OUT_DIR"),
                "/meshflow.orchestrator.v1.serde.rs"
            ));
        }
    }
    pub mod circuitbreaker {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/meshflow.circuitbreaker.v1.rs"));
            include!(concat!(
                env!("OUT_DIR"),
                "/meshflow.circuitbreaker.v1.serde.rs"
            ));
        }
    }
    pub mod webhook {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/meshflow.webhook.v1.rs"));
            include!(concat!(env!("OUT_DIR"), "/meshflow.webhook.v1.serde.rs"));
        }
    }
}

pub use meshflow::{circuitbreaker, execution, orchestrator, webhook, workflow};
