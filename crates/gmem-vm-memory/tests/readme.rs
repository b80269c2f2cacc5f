//! The README's device-layer example is `examples/wire_devices.rs`, word for word, and runs.

#[path = "../examples/wire_devices.rs"]
mod wire_devices;

#[test]
fn readme_example_is_the_compiled_example() {
    let readme = include_str!("../../../README.md");
    let example = include_str!("../examples/wire_devices.rs");
    let start = readme
        .find("<!-- examples/wire_devices.rs -->")
        .expect("README marks the example");
    let block = &readme[start..];
    let code_start = block.find("```rust").expect("code block");
    let code = &block[code_start..];
    let code = &code[code.find('\n').expect("line") + 1..];
    let code = &code[..code.find("```").expect("end of block")];
    assert_eq!(code, example, "README and examples/wire_devices.rs differ");
}

#[test]
fn readme_example_runs() {
    wire_devices::main().expect("the README example");
}
