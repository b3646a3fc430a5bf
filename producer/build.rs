//! Rebuild when a migration changes: `refinery::embed_migrations!` reads `migrations/` at
//! compile time, and cargo does not know it.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
