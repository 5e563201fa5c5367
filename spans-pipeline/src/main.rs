//! `spans-pipeline` command line. Being built; see issues 4 and 6.

fn main() {
    eprintln!("spans-pipeline: not built yet");
}
