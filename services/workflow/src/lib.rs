//! Workflow definitions: the definition language (validation, CEL expressions, templates), the
//! stores of workflows, versions, templates and transformation rules, and their gRPC services.

pub mod expr;
pub mod functions;
pub mod validate;
