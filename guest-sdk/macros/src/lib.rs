//! `#[task]`: the attribute behind `wasmq_guest::task`. Use it through the
//! `wasmq-guest` crate, which documents it; this crate only generates code.
//!
//! The attribute keeps the function as written and adds the export glue: a
//! hidden type implementing the component's `Guest` trait whose `run` calls
//! `wasmq_guest::__private::dispatch` with the function, and the
//! `export!` invocation that makes it the component's `run` export.

use proc_macro::TokenStream;
use quote::quote;
use syn::{parse_macro_input, spanned::Spanned, FnArg, ItemFn};

/// Marks the function that runs a job. See `wasmq_guest::task`.
#[proc_macro_attribute]
pub fn task(attr: TokenStream, item: TokenStream) -> TokenStream {
    if !attr.is_empty() {
        let attr = proc_macro2::TokenStream::from(attr);
        return syn::Error::new(attr.span(), "#[wasmq_guest::task] takes no arguments")
            .to_compile_error()
            .into();
    }
    let func = parse_macro_input!(item as ItemFn);
    if let Err(e) = check_signature(&func) {
        return e.to_compile_error().into();
    }
    let name = &func.sig.ident;

    quote! {
        // Natively nothing calls the function (the export below is
        // wasm-only); marking it used keeps its argument and result types
        // from being reported as dead code too.
        #[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
        #func

        // The glue lives in an anonymous const so its names cannot clash
        // with the task crate's.
        const _: () = {
            struct __WasmqTask;

            impl ::wasmq_guest::__private::Guest for __WasmqTask {
                fn run(
                    job: ::wasmq_guest::__private::JobContext,
                    payload: ::std::string::String,
                ) -> ::core::result::Result<
                    ::std::string::String,
                    ::wasmq_guest::__private::WitTaskError,
                > {
                    ::wasmq_guest::__private::dispatch(job, payload, #name)
                }
            }

            // Only components export `run`: a native build of the crate (an
            // rlib linked into a benchmark, say) must not define C symbols.
            #[cfg(target_arch = "wasm32")]
            ::wasmq_guest::bindings::__export_task_world!(__WasmqTask);
        };
    }
    .into()
}

/// Rejects signatures `dispatch` cannot call, with an error on the function
/// rather than deep inside the expansion.
fn check_signature(func: &ItemFn) -> syn::Result<()> {
    let sig = &func.sig;
    if sig.asyncness.is_some() {
        return Err(syn::Error::new(
            sig.asyncness.span(),
            "a wasmq task function cannot be async",
        ));
    }
    if !sig.generics.params.is_empty() {
        return Err(syn::Error::new(
            sig.generics.span(),
            "a wasmq task function cannot be generic",
        ));
    }
    let typed = sig
        .inputs
        .iter()
        .filter(|a| matches!(a, FnArg::Typed(_)))
        .count();
    if typed != 2 || sig.inputs.len() != 2 {
        return Err(syn::Error::new(
            sig.inputs.span(),
            "a wasmq task function takes (job: &Job, args: Args) \
             where Args: serde::Deserialize",
        ));
    }
    Ok(())
}
