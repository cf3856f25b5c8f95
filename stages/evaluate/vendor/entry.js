// The parts of three.js that stages/evaluate/viewer.js uses, bundled by build.sh into
// three.min.js (an IIFE that sets the global THREE). Add an export here when viewer.js needs more.
export {
  AmbientLight, BufferAttribute, BufferGeometry, ColorManagement, DirectionalLight, DoubleSide,
  LinearSRGBColorSpace, LineBasicMaterial, LineSegments, Mesh, MeshBasicMaterial, MeshLambertMaterial,
  PerspectiveCamera, Scene, WebGLRenderer,
} from "three";
export { OrbitControls } from "three/addons/controls/OrbitControls.js";
