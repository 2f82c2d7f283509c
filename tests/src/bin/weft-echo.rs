//! The test backend as a program, for benchmarks and demos:
//! `weft-echo --listen 127.0.0.1:9000 [--name api] [--delay-ms 5]`.

use std::time::Duration;

use weft_testkit::Backend;

fn main() {
    let mut listen = "127.0.0.1:9000".to_owned();
    let mut name = "echo".to_owned();
    let mut delay_ms = 0u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--listen" => listen = value(),
            "--name" => name = value(),
            "--delay-ms" => delay_ms = value().parse().unwrap_or_else(|_| usage("bad --delay-ms")),
            _ => usage(&format!("unknown argument {a}")),
        }
    }
    let addr = listen.parse().unwrap_or_else(|_| usage("bad --listen"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| usage(&e.to_string()));
    rt.block_on(async {
        let backend = Backend::start_on(addr, &name).await;
        backend.set_delay(Duration::from_millis(delay_ms));
        eprintln!(
            "weft-echo {name} listening on {} (delay {delay_ms} ms)",
            backend.addr
        );
        std::future::pending::<()>().await;
    });
}

fn usage(why: &str) -> ! {
    eprintln!("weft-echo: {why}\nusage: weft-echo --listen IP:PORT [--name NAME] [--delay-ms MS]");
    std::process::exit(2);
}
