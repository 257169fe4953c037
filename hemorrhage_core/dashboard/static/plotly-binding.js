// Shiny output binding for hemorrhage_core.dashboard.figures: draws plotly JSON with the local plotly.js.
(function () {
  "use strict";
  const binding = new Shiny.OutputBinding();
  Object.assign(binding, {
    find: function (scope) {
      return $(scope).find(".hemorrhage-plotly");
    },
    renderValue: function (el, payload) {
      if (!payload) {
        Plotly.purge(el);
        return;
      }
      const figure = JSON.parse(payload.figure);
      Plotly.react(el, figure.data || [], figure.layout || {}, payload.config || {});
    },
    renderError: function (el, err) {
      Plotly.purge(el);
      Shiny.OutputBinding.prototype.renderError.call(this, el, err);
    },
    clearError: function (el) {
      Shiny.OutputBinding.prototype.clearError.call(this, el);
    },
  });
  Shiny.outputBindings.register(binding, "hemorrhage.plotly");

  // Plots drawn while their card was narrow (sidebar toggles, full-screen cards) follow the new size.
  const resizeAll = function () {
    document.querySelectorAll(".hemorrhage-plotly.js-plotly-plot").forEach(function (el) {
      if (el.offsetParent !== null) Plotly.Plots.resize(el);
    });
  };
  $(document).on("shown.bs.tab bslib.card bslib.sidebar", function () {
    window.setTimeout(resizeAll, 50);
  });
})();
