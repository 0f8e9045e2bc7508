//! The registry of built-in functions a FUNCTION_CALL step may call. Definitions are checked against
//! it (unknown function, missing or unexpected argument); `docs/functions.md` documents each one.

/// A parameter of a built-in function.
#[derive(Debug, Clone, Copy)]
pub struct Param {
    /// Argument name.
    pub name: &'static str,
    /// Whether the call must give it.
    pub required: bool,
}

/// A built-in function.
#[derive(Debug, Clone, Copy)]
pub struct Function {
    /// Name used in `function_call.function`.
    pub name: &'static str,
    /// Its parameters.
    pub params: &'static [Param],
    /// What it returns.
    pub summary: &'static str,
}

const fn req(name: &'static str) -> Param {
    Param {
        name,
        required: true,
    }
}

const fn opt(name: &'static str) -> Param {
    Param {
        name,
        required: false,
    }
}

/// Every built-in function, by name.
pub const BUILTINS: &[Function] = &[
    Function {
        name: "uuid",
        params: &[],
        summary: "a new UUIDv7 string",
    },
    Function {
        name: "now",
        params: &[],
        summary: "the current time as an RFC 3339 string",
    },
    Function {
        name: "sum",
        params: &[req("values")],
        summary: "the sum of a list of numbers",
    },
    Function {
        name: "sha256",
        params: &[req("value")],
        summary: "hex SHA-256 of a string",
    },
    Function {
        name: "hmac_sha256",
        params: &[req("key"), req("value")],
        summary: "base64 HMAC-SHA256 of a string",
    },
    Function {
        name: "base64_encode",
        params: &[req("value")],
        summary: "base64 of a string",
    },
    Function {
        name: "base64_decode",
        params: &[req("value")],
        summary: "the string a base64 text encodes",
    },
    Function {
        name: "json_parse",
        params: &[req("text")],
        summary: "the JSON value a string holds",
    },
    Function {
        name: "json_stringify",
        params: &[req("value")],
        summary: "a value as compact JSON text",
    },
    Function {
        name: "log",
        params: &[req("message"), opt("level")],
        summary: "writes a LOG event; returns null",
    },
];

/// Looks a built-in up by name.
pub fn lookup(name: &str) -> Option<&'static Function> {
    BUILTINS.iter().find(|f| f.name == name)
}
