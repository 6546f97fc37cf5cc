#![no_std]
// This file exists so that netns-user can name this crate as a build-dependency; the
// programs live in the `netns` binary target, built for bpfel-unknown-none by aya-build.
