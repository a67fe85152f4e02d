//! The web app is served by natter itself: embedded in the binary, or from `--web-dir`, with
//! caching headers that suit Vite's hashed assets.

use crate::helpers::*;

async fn get(app: &TestApp, path: &str, etag: Option<&str>) -> reqwest::Response {
    let mut req = app.http.get(app.url(path));
    if let Some(e) = etag {
        req = req.header("if-none-match", e);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn serves_the_app_with_caching_headers_and_client_side_routes() {
    let web = tempfile::tempdir().unwrap();
    std::fs::write(web.path().join("index.html"), "<!doctype html><title>natter</title>").unwrap();
    std::fs::create_dir(web.path().join("assets")).unwrap();
    std::fs::write(web.path().join("assets/app-1a2b3c.js"), "console.log(1)").unwrap();
    let dir = web.path().to_path_buf();
    let app = TestApp::spawn_with(move |c| c.web_dir = Some(dir)).await;

    let res = get(&app, "/", None).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["cache-control"], "no-cache");
    assert!(res.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let etag = res.headers()["etag"].to_str().unwrap().to_owned();
    assert_eq!(res.text().await.unwrap(), "<!doctype html><title>natter</title>");
    assert_eq!(get(&app, "/", Some(&etag)).await.status(), 304, "revalidation is cheap");

    let res = get(&app, "/assets/app-1a2b3c.js", None).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["cache-control"], "public, max-age=31536000, immutable");
    assert!(res.headers()["content-type"].to_str().unwrap().starts_with("text/javascript"));

    let res = get(&app, "/chat/some-bot", None).await;
    assert_eq!(res.status(), 200, "client-side routes get the app");
    assert!(res.text().await.unwrap().contains("<title>natter</title>"));
    assert_eq!(get(&app, "/assets/missing.js", None).await.status(), 404);
    assert_eq!(get(&app, "/..%2f..%2fetc%2fpasswd.txt", None).await.status(), 404);
    // The API keeps its own JSON 404s.
    let res = get(&app, "/api/nope", None).await;
    assert_eq!(res.status(), 404);
    assert_eq!(res.json::<serde_json::Value>().await.unwrap()["error"]["code"], "not_found");
}

#[tokio::test]
async fn the_built_app_is_in_the_binary() {
    let dist = concat!(env!("CARGO_MANIFEST_DIR"), "/../../web/dist/index.html");
    let index = std::fs::read_to_string(dist).expect("web/dist is built (`make web`) before the Rust tests run");
    let app = TestApp::spawn().await;
    assert!(natter_server::web::available(&app.state.config));
    let res = get(&app, "/", None).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), index);
}
