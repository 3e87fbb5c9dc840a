// Retry buttons: POST /api/retry/<target> with the token typed into the page, in the Authorization
// header (never a cookie, so another site cannot trigger it). The page works without this script.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  for (const button of document.querySelectorAll("button.retry")) {
    button.addEventListener("click", async () => {
      const token = (document.getElementById("token") || {}).value || "";
      const response = await fetch("/api/retry/" + encodeURIComponent(button.dataset.target), {
        method: "POST",
        headers: { Authorization: "Bearer " + token },
      });
      button.textContent = response.ok ? "requeued" : "refused (" + response.status + ")";
    });
  }
});
