// The 3D view of report.html: the mesh that stages/evaluate/viewer.py packs into #viewer-data,
// drawn with three.js (vendor/three.min.js, global THREE) under OrbitControls. Needs WebGL 2 and
// DecompressionStream; without them (or without JavaScript) the status line says why the view
// is off and the static renders stay. #viewer's data-state: loading, then ready or off.
(function () {
  "use strict";
  var root = document.getElementById("viewer");
  if (!root) return;
  var status = root.querySelector(".viewer-status");
  var canvas = root.querySelector("canvas");

  function off(reason) {
    root.dataset.state = "off";
    status.textContent = "3D view off: " + reason + "; the static renders below stay.";
  }

  // The embedded blob: base64 -> zlib-inflated ArrayBuffer (no request: a Blob's own stream).
  function inflate(base64) {
    var text = atob(base64), bytes = new Uint8Array(text.length);
    for (var i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
    var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Response(stream).arrayBuffer();
  }

  var ARRAY_TYPES = { uint8: Uint8Array, uint16: Uint16Array, int32: Int32Array, float32: Float32Array };

  function unpack(buffer, layout) {
    var arrays = {};
    layout.forEach(function (entry) {
      arrays[entry.name] = new ARRAY_TYPES[entry.type](buffer, entry.offset, entry.count);
    });
    return arrays;
  }

  function meshGeometry(data, arrays) {
    var q = arrays.position, position = new Float32Array(q.length);
    for (var i = 0; i < q.length; i++) position[i] = data.origin[i % 3] + q[i] * data.scale;
    var delta = arrays.index, index = new Uint32Array(delta.length), sum = 0;
    for (var k = 0; k < delta.length; k++) { sum += delta[k]; index[k] = sum; }
    var geometry = new THREE.BufferGeometry();
    geometry.setAttribute("position", new THREE.BufferAttribute(position, 3));
    if (arrays.color) geometry.setAttribute("color", new THREE.BufferAttribute(arrays.color, 3, true));
    geometry.setIndex(new THREE.BufferAttribute(index, 1));
    geometry.computeVertexNormals();
    return geometry;
  }

  function overlayLines(overlay, arrays) {
    var geometry = new THREE.BufferGeometry();
    geometry.setAttribute("position", new THREE.BufferAttribute(arrays[overlay.array], 3));
    return new THREE.LineSegments(geometry, new THREE.LineBasicMaterial({ color: overlay.color }));
  }

  function checkbox(label, color, onChange) {
    var box = document.createElement("input");
    box.type = "checkbox";
    box.checked = true;
    box.addEventListener("change", function () { onChange(box.checked); });
    var wrap = document.createElement("label");
    wrap.style.color = color;
    wrap.append(box, " " + label);
    return wrap;
  }

  function build(data, arrays, gl) {
    THREE.ColorManagement.enabled = false; // vertex colours are shown as stored (sRGB bytes)
    var renderer = new THREE.WebGLRenderer({ canvas: canvas, context: gl });
    renderer.outputColorSpace = THREE.LinearSRGBColorSpace;
    renderer.setPixelRatio(window.devicePixelRatio || 1);
    renderer.setClearColor(0xf4f4f4);
    var v = data.view, scene = new THREE.Scene();
    var camera = new THREE.PerspectiveCamera(v.fov, 1, v.near, v.far);
    camera.up.fromArray(v.up);
    camera.position.fromArray(v.eye);
    var headlight = new THREE.DirectionalLight(0xffffff, 2.4);
    camera.add(headlight); // a light at the eye, shining along the view (its target: the origin ahead)
    headlight.position.set(0, 0, 0);
    headlight.target.position.set(0, 0, -1);
    camera.add(headlight.target);
    scene.add(camera, new THREE.AmbientLight(0xffffff, 0.8));

    var geometry = meshGeometry(data, arrays);
    var looks = {
      colours: new THREE.MeshBasicMaterial({ vertexColors: true, side: THREE.DoubleSide }),
      shading: new THREE.MeshLambertMaterial({ color: 0xb8b8b8, side: THREE.DoubleSide }),
    };
    var mesh = new THREE.Mesh(geometry, arrays.color ? looks.colours : looks.shading);
    scene.add(mesh);
    var controls = new THREE.OrbitControls(camera, canvas);
    controls.target.fromArray(v.target);
    controls.update();
    controls.saveState();

    function render() { renderer.render(scene, camera); }
    function resize() {
      var width = root.clientWidth, height = Math.round(Math.min(640, 0.6 * width));
      renderer.setSize(width, height, false);
      canvas.style.height = height + "px";
      camera.aspect = width / height;
      camera.updateProjectionMatrix();
      render();
    }
    controls.addEventListener("change", render);
    window.addEventListener("resize", resize);

    root.querySelector('[data-action="reset"]').addEventListener("click", function () { controls.reset(); });
    root.querySelectorAll('input[name="viewer-look"]').forEach(function (radio) {
      if (radio.value === "colours" && !arrays.color) radio.disabled = true;
      radio.checked = (mesh.material === looks[radio.value]);
      radio.addEventListener("change", function () { mesh.material = looks[radio.value]; render(); });
    });
    var overlayBox = root.querySelector(".overlays");
    data.overlays.forEach(function (overlay) {
      var lines = overlayLines(overlay, arrays);
      scene.add(lines);
      overlayBox.append(checkbox(overlay.label, overlay.color, function (on) { lines.visible = on; render(); }));
    });

    root.dataset.state = "ready";
    resize();
    status.textContent = "3D view: the cleaned mesh" + (arrays.color ? " with its vertex colours" : "") + ".";
    requestAnimationFrame(function () { root.dataset.frame = "drawn"; });
  }

  if (!window.THREE) return off("three.js did not load");
  if (!window.DecompressionStream) return off("this browser cannot unpack the embedded mesh (no DecompressionStream)");
  var gl = canvas.getContext("webgl2", { antialias: true });
  if (!gl) return off("this browser gives no WebGL 2 context (hardware acceleration off, or not supported)");
  status.textContent = "3D view: loading the mesh…";
  var data = JSON.parse(document.getElementById("viewer-data").textContent);
  inflate(data.blob)
    .then(function (buffer) { build(data, unpack(buffer, data.layout), gl); })
    .catch(function (error) { off("the viewer failed (" + error + ")"); });
})();
